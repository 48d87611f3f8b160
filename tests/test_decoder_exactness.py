"""The generic decoder against transformers on tiny random fp32 checkpoints, every family.

For each case: logits of every prompt position agree to 1e-4, greedy decoding of 32 tokens equals
transformers' `generate(do_sample=False)` token for token, and a prefill of n tokens gives the same
logits as n one-token steps (tests/support_decoder.py). Cases: Mixtral (sliding window, top-1/3,
tied embeddings), Qwen2-MoE (shared expert gate, dense layers, sliding), Qwen3-MoE and OLMoE (per-head
and full-width q/k norms, attention biases, clip_qkv, decoder_sparse_step), DeepSeek-V2 (greedy and
group-limited routing, q LoRA on and off, YaRN) and DeepSeek-V3 (noaux_tc with groups and correction
bias, interleaved and half-split rope); MLA's expanded and absorbed attention are both checked.
"""

from __future__ import annotations

import pytest
import torch

from moeinf.errors import ContextTooLong
from moeinf.models.attention import MLAAttention
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
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-nonorm-top3-step2-bias-sliding": (
        "qwen3_moe",
        {
            "norm_topk_prob": False,
            "num_experts_per_tok": 3,
            "num_hidden_layers": 3,
            "decoder_sparse_step": 2,
            "attention_bias": True,
            "use_sliding_window": True,
            "sliding_window": 9,
        },
    ),
    "olmoe": ("olmoe", {}),
    "olmoe-clip-top3-E12-norm": (
        "olmoe",
        {"clip_qkv": 0.3, "num_experts_per_tok": 3, "num_experts": 12, "norm_topk_prob": True},
    ),
    "deepseek_v2-lite": ("deepseek_v2", {}),
    "deepseek_v2-groups-qlora": (
        "deepseek_v2",
        {
            "q_lora_rank": 24,
            "topk_method": "group_limited_greedy",
            "n_routed_experts": 12,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 3,
            "routed_scaling_factor": 1.7,
        },
    ),
    "deepseek_v2-yarn": ("deepseek_v2", {"rope_parameters": battery.YARN}),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3-groups-noqlora-yarn": (
        "deepseek_v3",
        {
            "q_lora_rank": None,
            "n_routed_experts": 12,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 3,
            "norm_topk_prob": False,
            "rope_parameters": battery.YARN,
        },
    ),
    "deepseek_v3-top1-halves": (
        "deepseek_v3",
        {"num_experts_per_tok": 1, "rope_interleave": False, "n_shared_experts": 2},
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


@pytest.mark.parametrize(
    "pair", [c for c, (family, _) in CASES.items() if family.startswith("deepseek")], indirect=True
)
def test_expanded_and_absorbed_attention_both_match_transformers(pair):
    """Large prefills expand the latent cache, short ones fold kv_b_proj into q/o: check both paths."""
    model, decoder, prompt = pair
    assert isinstance(decoder.layers[0].attn, MLAAttention)
    attentions = [layer.attn for layer in decoder.layers]
    for limit in (0, 1 << 30):
        for attn in attentions:
            attn.absorb_max_tokens = limit
        battery.check_logits(model, decoder, prompt)
        battery.check_prefill_equals_steps(decoder, prompt)
