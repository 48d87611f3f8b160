"""Qwen3-MoE adapter: GQA with per-head q/k RMSNorm (over head_dim), optional attention bias on q/k/v/o,
softmax routing (renormalised iff norm_topk_prob), no shared expert, dense layers via
mlp_only_layers/decoder_sparse_step, sliding window on all layers iff use_sliding_window.

Reference: transformers models/qwen3_moe (configuration + modeling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.errors import InvalidSpec
from moeinf.models.adapters import base
from moeinf.models.spec import AttentionSpec, ModelSpec, RoutingSpec

RENAMES = {**base.COMMON_LAYER_RENAMES, **base.GQA_RENAMES, "mlp.gate.weight": "moe.router.weight"}


class Qwen3MoeAdapter:
    family = "qwen3_moe"

    def spec(self, config: Mapping[str, Any]) -> ModelSpec:
        base.check_activation(config)
        d, heads = base.need(config, "hidden_size"), base.need(config, "num_attention_heads")
        head_dim = config.get("head_dim") or d // heads
        layers = base.need(config, "num_hidden_layers")
        if int(config.get("decoder_sparse_step") or 1) < 1:
            raise InvalidSpec("decoder_sparse_step must be >= 1")
        window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
        bias = bool(config.get("attention_bias", False))
        attention = AttentionSpec(
            kind="gqa",
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="per_head",
            rope=base.parse_rope(config, head_dim, default_theta=10000.0),
            softmax_scale=head_dim**-0.5,
            sliding_window=window,
            sliding_layers=tuple(range(layers)) if window else (),
        )
        return ModelSpec(
            family=self.family,
            **base.common_fields(config, rms_norm_eps=1e-6),
            num_experts=config.get("num_experts") or base.need(config, "num_local_experts"),
            top_k=base.need(config, "num_experts_per_tok"),
            expert_dim=base.need(config, "moe_intermediate_size"),
            moe_layers=base.moe_layers_qwen(config, layers),
            dense_dim=base.need(config, "intermediate_size"),
            attention=attention,
            routing=RoutingSpec(scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False))),
        )

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> base.Mapped:
        return base.map_standard(hf_key, spec, RENAMES)
