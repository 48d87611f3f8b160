"""The generic decoder against transformers on tiny random fp32 checkpoints: DeepSeek-V3 (MLA).

Same battery as test_decoder_exactness.py (tests/support_decoder.py). V3: noaux_tc routing with
several groups and the correction bias, q LoRA on and off, YaRN rope, interleaved and half-split
rope, top-1 and top-3.
"""

from __future__ import annotations

import pytest

from tests import support_decoder as battery

CASES = {
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
