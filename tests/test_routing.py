"""route() against a naive per-token Python loop written from the papers' / transformers' descriptions."""

from __future__ import annotations

import math

import pytest
import torch

from moeinf.models.routing import route


def naive_route(row, *, top_k, scoring, renormalize, n_group, topk_group, group_scoring, bias, scale):
    """One token, plain Python floats: returns {expert: weight}."""
    if scoring == "softmax":
        m = max(row)
        exps = [math.exp(x - m) for x in row]
        scores = [x / sum(exps) for x in exps]
    else:
        scores = [1.0 / (1.0 + math.exp(-x)) for x in row]
    choice = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
    allowed = list(range(len(row)))
    if group_scoring is not None:
        size = len(row) // n_group
        groups = [choice[g * size : (g + 1) * size] for g in range(n_group)]
        if group_scoring == "max":
            rank = [max(g) for g in groups]
        else:
            rank = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        best = sorted(range(n_group), key=lambda g: -rank[g])[:topk_group]
        allowed = [i for i in allowed if i // size in best]
    chosen = sorted(allowed, key=lambda i: -choice[i])[:top_k]
    weights = {i: scores[i] for i in chosen}
    if renormalize:
        total = sum(weights.values())
        weights = {i: w / total for i, w in weights.items()}
    return {i: w * scale for i, w in weights.items()}


CASES = {
    "mixtral-top2": dict(E=8, top_k=2, scoring="softmax", renormalize=True),
    "top1-renorm": dict(E=8, top_k=1, scoring="softmax", renormalize=True),
    "qwen-top3-no-renorm-E6": dict(E=6, top_k=3, scoring="softmax", renormalize=False),
    "olmoe-top8-E13": dict(E=13, top_k=8, scoring="softmax", renormalize=False),
    "v2-greedy-scaled": dict(E=10, top_k=3, scoring="softmax", scale=16.0),
    "v2-groups-8x3": dict(
        E=24, top_k=4, scoring="softmax", n_group=8, topk_group=3, group_scoring="max", scale=2.0
    ),
    "v2-groups-3x1": dict(E=12, top_k=2, scoring="softmax", n_group=3, topk_group=1, group_scoring="max"),
    "v3-noaux-4x2": dict(
        E=16,
        top_k=4,
        scoring="sigmoid",
        renormalize=True,
        n_group=4,
        topk_group=2,
        group_scoring="top2_sum",
        bias=True,
        scale=2.5,
    ),
    "v3-noaux-3x2-top3": dict(
        E=12,
        top_k=3,
        scoring="sigmoid",
        renormalize=True,
        n_group=3,
        topk_group=2,
        group_scoring="top2_sum",
        bias=True,
    ),
    "v3-no-renorm-1group": dict(
        E=6,
        top_k=1,
        scoring="sigmoid",
        n_group=1,
        topk_group=1,
        group_scoring="top2_sum",
        bias=True,
        scale=1.5,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_route_matches_naive_loop(case):
    c = dict(CASES[case])
    e = c.pop("E")
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    logits = torch.randn(37, e, generator=gen) * 2.0
    bias = torch.randn(e, generator=gen) * 0.3 if c.pop("bias", False) else None
    kwargs = dict(
        top_k=c["top_k"],
        scoring=c["scoring"],
        renormalize=c.get("renormalize", False),
        n_group=c.get("n_group", 1),
        topk_group=c.get("topk_group", 1),
        group_scoring=c.get("group_scoring"),
    )
    weights, ids = route(logits, correction_bias=bias, routed_scaling_factor=c.get("scale", 1.0), **kwargs)
    assert weights.shape == ids.shape == (37, c["top_k"]) and weights.dtype == torch.float32
    for t in range(logits.shape[0]):
        want = naive_route(
            logits[t].double().tolist(),
            bias=None if bias is None else bias.double().tolist(),
            scale=c.get("scale", 1.0),
            **kwargs,
        )
        got = dict(zip(ids[t].tolist(), weights[t].tolist(), strict=True))
        assert set(got) == set(want), f"token {t}"
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-5, abs=1e-7)


def test_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3]])
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0])
    weights, ids = route(
        logits, top_k=1, scoring="sigmoid", n_group=1, group_scoring="top2_sum", correction_bias=bias
    )
    assert ids.tolist() == [[0]] and weights.item() == pytest.approx(0.5)


def test_softmax_matches_transformers_qwen_router_bitwise():
    from transformers import AutoConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    from tests.fixtures.checkpoints import tiny_config

    config = AutoConfig.for_model(
        "qwen2_moe", **tiny_config("qwen2_moe", norm_topk_prob=True, num_experts_per_tok=3)
    )
    router = Qwen2MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(9, config.hidden_size)
    _, want_w, want_i = router(x)
    got_w, got_i = route(torch.nn.functional.linear(x, router.weight), top_k=3, renormalize=True)
    assert torch.equal(got_i, want_i) and torch.equal(got_w, want_w)


def test_sigmoid_groups_match_transformers_deepseek_v3_router_bitwise():
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from tests.fixtures.checkpoints import tiny_config

    config = AutoConfig.for_model(
        "deepseek_v3",
        **tiny_config("deepseek_v3", n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3),
    )
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    torch.nn.init.normal_(router.e_score_correction_bias, std=0.1)
    x = torch.randn(9, config.hidden_size)
    _, want_w, want_i = router(x)
    got_w, got_i = route(
        torch.nn.functional.linear(x, router.weight),
        top_k=3,
        scoring="sigmoid",
        renormalize=True,
        n_group=4,
        topk_group=2,
        group_scoring="top2_sum",
        correction_bias=router.e_score_correction_bias,
        routed_scaling_factor=config.routed_scaling_factor,
    )
    order_w, order_i = got_i.sort(dim=-1), want_i.sort(dim=-1)
    assert torch.equal(order_w.values, order_i.values)
    assert torch.equal(got_w.gather(1, order_w.indices), want_w.gather(1, order_i.indices))
