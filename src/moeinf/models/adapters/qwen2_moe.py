"""Qwen2-MoE adapter: GQA with q/k/v biases, softmax routing (renormalised iff norm_topk_prob), one
shared expert gated by sigmoid(shared_expert_gate(x)), dense layers via mlp_only_layers/decoder_sparse_step,
optional sliding window on the layers `layer_types` marks.

Reference: transformers models/qwen2_moe (configuration + modeling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.errors import InvalidSpec
from moeinf.models.adapters import base
from moeinf.models.spec import AttentionSpec, ModelSpec, RoutingSpec

RENAMES = {
    **base.COMMON_LAYER_RENAMES,
    **base.GQA_RENAMES,
    "mlp.gate.weight": "moe.router.weight",
    **{
        f"mlp.shared_expert.{p}.weight": f"moe.shared.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    },
    "mlp.shared_expert_gate.weight": "moe.shared_gate.weight",
}


def _sliding(config: Mapping[str, Any], layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Mirror Qwen2MoeConfig.__post_init__: no window unless use_sliding_window."""
    if not config.get("use_sliding_window", False):
        return None, ()
    window = config.get("sliding_window")
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < config.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)
    ]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise InvalidSpec(f"unsupported layer_types {types!r}")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if sliding and not window:
        raise InvalidSpec("sliding attention layers without a sliding_window")
    return (window, sliding) if sliding else (None, ())


class Qwen2MoeAdapter:
    family = "qwen2_moe"

    def spec(self, config: Mapping[str, Any]) -> ModelSpec:
        base.check_activation(config)
        d, heads = base.need(config, "hidden_size"), base.need(config, "num_attention_heads")
        head_dim = config.get("head_dim") or d // heads
        layers = base.need(config, "num_hidden_layers")
        if int(config.get("decoder_sparse_step") or 1) < 1:
            raise InvalidSpec("decoder_sparse_step must be >= 1")
        window, sliding = _sliding(config, layers)
        shared = base.need(config, "shared_expert_intermediate_size")
        attention = AttentionSpec(
            kind="gqa",
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            qkv_bias=bool(config.get("qkv_bias", True)),
            rope=base.parse_rope(config, head_dim, default_theta=10000.0),
            softmax_scale=head_dim**-0.5,
            sliding_window=window,
            sliding_layers=sliding,
        )
        return ModelSpec(
            family=self.family,
            **base.common_fields(config, rms_norm_eps=1e-6),
            num_experts=base.need(config, "num_experts"),
            top_k=base.need(config, "num_experts_per_tok"),
            expert_dim=base.need(config, "moe_intermediate_size"),
            moe_layers=base.moe_layers_qwen(config, layers),
            dense_dim=base.need(config, "intermediate_size"),
            attention=attention,
            routing=RoutingSpec(scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False))),
            num_shared_experts=1,
            shared_expert_dim=shared,
            shared_expert_gate=True,
        )

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> base.Mapped:
        return base.map_standard(hf_key, spec, RENAMES)
