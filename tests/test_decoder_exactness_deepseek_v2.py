"""The generic decoder against transformers on tiny random fp32 checkpoints: DeepSeek-V2 (MLA).

Same battery as test_decoder_exactness.py (tests/support_decoder.py). V2: greedy and
group_limited_greedy routing with several groups, q LoRA on and off, YaRN rope.
"""

from __future__ import annotations

import pytest

from tests import support_decoder as battery

CASES = {
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


def test_expanded_and_absorbed_attention_both_match_transformers(pair):
    """Large prefills expand the latent cache, short ones fold kv_b_proj into q/o: check both paths."""
    model, decoder, prompt = pair
    attentions = [layer.attn for layer in decoder.layers]
    for limit in (0, 1 << 30):
        for attn in attentions:
            attn.absorb_max_tokens = limit
        battery.check_logits(model, decoder, prompt)
        battery.check_prefill_equals_steps(decoder, prompt)
