"""The only router math in moeinf: `route()` turns router logits into expert weights and ids.

One pure function for every family; each knob is an argument (values come from RoutingSpec). The
order and dtype of operations mirror transformers' routers so that results match bit for bit in fp32:
MixtralTopKRouter / Qwen2Moe / Qwen3Moe / Olmoe (softmax in fp32, top-k, optional renormalisation),
DeepseekV2TopkRouter (softmax, optional group_limited_greedy by group max, scaling) and
DeepseekV3TopkRouter (sigmoid, correction bias for selection only, groups by sum of top-2, scaling).

Dimensions: T tokens, E experts, K top-k, G groups.
"""

from __future__ import annotations

import torch


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    n_group: int = 1,
    topk_group: int = 1,
    group_scoring: str | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(weights [T, K] fp32, ids [T, K] int64)` for router `logits [T, E]`.

    `group_scoring`: None (plain top-k), "max" (keep the `topk_group` groups with the highest max score)
    or "top2_sum" (rank groups by the sum of their two best biased scores). `correction_bias [E]` is
    added to the scores for selection only; the weights are the unbiased scores.
    """
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    elif scoring == "sigmoid":
        scores = logits.float().sigmoid()  # [T, E]
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float()  # [T, E]
    if group_scoring is not None:
        choice = _limit_to_best_groups(choice, n_group, topk_group, group_scoring)
    if group_scoring is None and correction_bias is None:
        weights, ids = torch.topk(scores, top_k, dim=-1)  # [T, K]
    else:
        ids = torch.topk(choice, top_k, dim=-1)[1]  # [T, K]
        weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        # DeepSeek-V3 guards its sigmoid sum with 1e-20; the softmax routers divide by the plain sum.
        denominator = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denominator + 1e-20 if scoring == "sigmoid" else denominator)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids


def _limit_to_best_groups(
    choice: torch.Tensor, n_group: int, topk_group: int, group_scoring: str
) -> torch.Tensor:
    """Mask every expert outside the `topk_group` best groups (scores [T, E] -> masked [T, E])."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)  # [T, G, E/G]
    if group_scoring == "max":
        group_scores = grouped.max(dim=-1).values  # [T, G]
        fill = 0.0  # DeepSeek-V2 masks with 0 (softmax scores are positive)
    elif group_scoring == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        fill = float("-inf")
    else:
        raise ValueError(f"unknown group scoring {group_scoring!r}")
    group_idx = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [T, G]
    keep = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e).bool()  # [T, E]
    return choice.masked_fill(~keep, fill)
