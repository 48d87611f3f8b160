"""The generic decoder against transformers on tiny random fp32 checkpoints: Qwen3-MoE and OLMoE.

Same battery as test_decoder_exactness.py (tests/support_decoder.py): per-head and full-width q/k
norms, attention biases, sliding window, clip_qkv, dense layers via decoder_sparse_step, top-3.
"""

from __future__ import annotations

import pytest

from tests import support_decoder as battery

CASES = {
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
