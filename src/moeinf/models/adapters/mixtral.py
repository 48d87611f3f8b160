"""Mixtral adapter: GQA without biases, softmax top-k routing always renormalised, no shared experts.

Reference: transformers models/mixtral (configuration + modeling). Hub checkpoints name experts
`block_sparse_moe.experts.E.w1/w3/w2` (gate/up/down).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.models.adapters import base
from moeinf.models.spec import AttentionSpec, ModelSpec, RoutingSpec

RENAMES = {
    **base.COMMON_LAYER_RENAMES,
    **base.GQA_RENAMES,
    "block_sparse_moe.gate.weight": "moe.router.weight",
    "mlp.gate.weight": "moe.router.weight",
}


class MixtralAdapter:
    family = "mixtral"

    def spec(self, config: Mapping[str, Any]) -> ModelSpec:
        base.check_activation(config)
        d, heads = base.need(config, "hidden_size"), base.need(config, "num_attention_heads")
        head_dim = config.get("head_dim") or d // heads
        layers = base.need(config, "num_hidden_layers")
        window = config.get("sliding_window")
        attention = AttentionSpec(
            kind="gqa",
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=base.parse_rope(config, head_dim, default_theta=1e6),
            softmax_scale=head_dim**-0.5,
            sliding_window=window,
            sliding_layers=tuple(range(layers)) if window else (),
        )
        return ModelSpec(
            family=self.family,
            **base.common_fields(config, rms_norm_eps=1e-5),
            num_experts=config.get("num_local_experts") or base.need(config, "num_experts"),
            top_k=base.need(config, "num_experts_per_tok"),
            expert_dim=base.need(config, "intermediate_size"),
            moe_layers=tuple(range(layers)),
            dense_dim=0,
            attention=attention,
            routing=RoutingSpec(scoring="softmax", renormalize=True),
        )

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> base.Mapped:
        return base.map_standard(hf_key, spec, RENAMES)
