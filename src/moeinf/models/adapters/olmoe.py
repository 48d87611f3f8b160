"""OLMoE adapter: GQA with full-width q/k RMSNorm (over all heads at once, before the head split),
optional clip_qkv clamping of q/k/v, optional bias on q/k/v/o, softmax routing (renormalised iff
norm_topk_prob), every layer MoE, no shared expert, no sliding window (transformers builds a plain
causal mask for OLMoE).

Reference: transformers models/olmoe (configuration + modeling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.errors import InvalidSpec
from moeinf.models.adapters import base
from moeinf.models.spec import AttentionSpec, ModelSpec, RoutingSpec

RENAMES = {**base.COMMON_LAYER_RENAMES, **base.GQA_RENAMES, "mlp.gate.weight": "moe.router.weight"}


class OlmoeAdapter:
    family = "olmoe"

    def spec(self, config: Mapping[str, Any]) -> ModelSpec:
        base.check_activation(config)
        d, heads = base.need(config, "hidden_size"), base.need(config, "num_attention_heads")
        head_dim = d // heads
        if config.get("head_dim") not in (None, head_dim) or head_dim * heads != d:
            raise InvalidSpec("OLMoE needs head_dim == hidden_size / num_attention_heads (full-width q norm)")
        layers = base.need(config, "num_hidden_layers")
        bias = bool(config.get("attention_bias", False))
        clip = config.get("clip_qkv")
        attention = AttentionSpec(
            kind="gqa",
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=float(clip) if clip is not None else None,
            rope=base.parse_rope(config, head_dim, default_theta=10000.0),
            softmax_scale=head_dim**-0.5,
        )
        return ModelSpec(
            family=self.family,
            **base.common_fields(config, rms_norm_eps=1e-5),
            num_experts=config.get("num_experts") or base.need(config, "num_local_experts"),
            top_k=base.need(config, "num_experts_per_tok"),
            expert_dim=base.need(config, "intermediate_size"),
            moe_layers=tuple(range(layers)),
            dense_dim=0,
            attention=attention,
            routing=RoutingSpec(scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False))),
        )

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> base.Mapped:
        return base.map_standard(hf_key, spec, RENAMES)
