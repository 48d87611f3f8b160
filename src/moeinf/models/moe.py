"""The MoE block: route with `route()`, then compute each routed expert as the ExpertProvider hands
it over, plus the shared expert(s) (DeepSeek) or the sigmoid-gated shared expert (Qwen2-MoE).

The block never touches files. With several tokens (prefill) the tokens of each expert are gathered,
computed in one batch and scattered back with index_add_; with one token (decode) the expert's
output is accumulated directly.

Dimensions: T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeinf import kernels
from moeinf.models.layers import MLP, swiglu
from moeinf.models.routing import route
from moeinf.models.spec import ModelSpec
from moeinf.runtime.expert_provider import ExpertProvider

if TYPE_CHECKING:
    from moeinf.runtime.routing_hooks import RoutingHook


class Router(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))  # [E, D]
        if spec.routing.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(spec.num_experts))  # [E]


class MoEBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, provider: ExpertProvider, moe_index: int) -> None:
        super().__init__()
        self.router = Router(spec)
        if spec.num_shared_experts:
            self.shared = MLP(spec.hidden_size, spec.shared_expert_dim)
        if spec.shared_expert_gate:
            self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.layer, self.top_k, self.routing = layer, spec.top_k, spec.routing
        self.has_shared, self.has_shared_gate = spec.num_shared_experts > 0, spec.shared_expert_gate
        self.provider = provider
        # The fused one-call path: half weights on the native kernels and a provider that can hold
        # a layer's experts at once (set by Decoder.build once the weights' dtype is known).
        self.holding = False
        self.moe_index = moe_index  # position among the MoE layers (routing hooks count these)
        self.hook: RoutingHook | None = None  # sees, and may replace, the router's choices
        self.last_ids: torch.Tensor | None = None  # [T, K] ids of the latest call

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, E], in fp32 where the family routes in fp32 (its router weight is kept fp32
        then, while activations may be half)."""
        if self.routing.logits_fp32:
            return F.linear(x.float(), self.router.weight.float())
        return F.linear(x, self.router.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        logits = self.router_logits(x)  # [T, E]
        weights, ids = route(
            logits,
            top_k=self.top_k,
            scoring=r.scoring,
            renormalize=r.renormalize,
            n_group=r.n_group,
            topk_group=r.topk_group,
            group_scoring=r.group_scoring,
            correction_bias=self.router.e_score_correction_bias if r.correction_bias else None,
            routed_scaling_factor=r.routed_scaling_factor,
        )  # [T, K] x2
        if self.hook is not None:
            weights, ids = self.hook.on_route(self.moe_index, weights, ids)
        self.last_ids = ids
        weights = weights.to(x.dtype)
        out = self._experts(x, weights, ids) if x.shape[0] > 1 else self._experts_one(x, weights, ids)
        if self.has_shared:
            shared = self.shared(x)  # [T, D]
            if self.has_shared_gate:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out

    def _experts_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token: x [1, D], weights/ids [1, K].

        Experts arrive in the provider's order (resident first), but are summed in ascending id
        order, as transformers does: floating-point addition is not associative, and the cache must
        not change a single bit of the output.
        """
        slot = {e: k for k, e in enumerate(ids[0].tolist())}
        if self.holding and self.provider.all_ready(self.layer, list(slot)):
            return self._experts_fused(x, weights, slot)
        parts: dict[int, torch.Tensor] = {}
        for expert, w in self.provider.experts(self.layer, list(slot)):
            parts[expert] = (
                swiglu(x, w.gate_proj, w.up_proj, w.down_proj) * weights[0, slot[expert]]
            )  # [1, D]
        out = torch.zeros_like(x)
        for expert in sorted(parts):
            out += parts[expert]
        return out

    def _experts_fused(self, x: torch.Tensor, weights: torch.Tensor, slot: dict[int, int]) -> torch.Tensor:
        """Every routed expert resident: one native call for the whole layer (two thread-pool jobs
        instead of two per expert), bit for bit the expert-at-a-time sum of _experts_one."""
        experts = self.provider.experts(self.layer, list(slot), hold=True)
        try:
            # exactly n items: the generator stays suspended (exhausting it would release them)
            got = dict(islice(experts, len(slot)))  # all pinned until close()
            order = sorted(got)  # ascending ids, as _experts_one sums
            out = kernels.try_moe_forward(x, [got[e] for e in order], weights[0, [slot[e] for e in order]])
            if out is None:  # the kernel does not take these weights: one at a time, same sums
                out = torch.zeros_like(x)
                for e in order:
                    w = got[e]
                    out += swiglu(x, w.gate_proj, w.up_proj, w.down_proj) * weights[0, slot[e]]
            return out
        finally:
            experts.close()

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Several tokens: group the tokens by expert, compute each expert once, scatter back
        in ascending expert order (see _experts_one)."""
        parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for expert, w in self.provider.experts(self.layer, torch.unique(ids).tolist()):
            token_idx, k_pos = torch.where(ids == expert)  # [n], [n]
            y = swiglu(x[token_idx], w.gate_proj, w.up_proj, w.down_proj)  # [n, D]
            parts[expert] = (token_idx, y * weights[token_idx, k_pos, None])
        out = torch.zeros_like(x)
        for expert in sorted(parts):
            token_idx, y = parts[expert]
            out.index_add_(0, token_idx, y)
        return out
