"""The generic decoder against transformers on tiny random fp32 checkpoints: Mixtral, Qwen2-MoE.

For each case: logits of every prompt position agree to 1e-4, greedy decoding of 32 tokens equals
transformers' `generate(do_sample=False)` token for token, and a prefill of n tokens gives the same
logits as n one-token steps (tests/support_decoder.py). Mixtral and Qwen2-MoE here; Qwen3-MoE and
OLMoE in *_qwen3_olmoe.py, DeepSeek (MLA) in *_deepseek_v2.py / *_deepseek_v3.py.
"""

from __future__ import annotations

import pytest
import torch

from moeinf.errors import ContextTooLong
from tests import support_decoder as battery

CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-top1-sliding": ("mixtral", {"num_experts_per_tok": 1, "sliding_window": 7}),
    "mixtral-top3-E6-tied": (
        "mixtral",
        {"num_experts_per_tok": 3, "num_local_experts": 6, "tie_word_embeddings": True},
    ),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-norm-top3-E7-dense0": (
        "qwen2_moe",
        {"norm_topk_prob": True, "num_experts_per_tok": 3, "num_experts": 7, "mlp_only_layers": [0]},
    ),
    "qwen2_moe-sliding": (
        "qwen2_moe",
        {"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2},
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    return battery.make_pair(family, overrides, len(request.param), tmp_path_factory.mktemp(request.param))


def test_logits_match_transformers(pair):
    battery.check_logits(*pair)


def test_greedy_decoding_matches_transformers_generate(pair):
    battery.check_greedy(*pair)


def test_prefill_equals_single_steps(pair):
    battery.check_prefill_equals_steps(*pair[1:])


def test_context_limit_is_a_clear_error(pair):
    _, decoder, prompt = pair
    decoder.reset()
    with pytest.raises(ContextTooLong, match="64"):
        decoder(torch.zeros(65, dtype=torch.long), 0)
    with pytest.raises(ContextTooLong):
        decoder(prompt[:1], 64)


def test_chunked_prefill_equals_one_pass(pair):
    _, decoder, prompt = pair
    decoder.reset()
    whole = decoder(prompt, 0)
    decoder.prefill_chunk = 5
    try:
        decoder.reset()
        assert torch.allclose(decoder(prompt, 0), whole, atol=1e-5, rtol=0)
        decoder.reset()
        assert torch.allclose(decoder(prompt, 0, last_only=True), whole[-1:], atol=1e-5, rtol=0)
    finally:
        decoder.prefill_chunk = 512
