"""What DeepSeek-V2 and -V3 share: multi-head latent attention, leading dense layers, shared experts.

Reference: transformers models/deepseek_v2 and deepseek_v3 (configuration + modeling). The softmax
scale gets YaRN's mscale(factor, mscale_all_dim)^2 when the rope is scaled (`yarn_apply_mscale`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.errors import InvalidSpec
from moeinf.models.adapters import base
from moeinf.models.spec import AttentionSpec, ModelSpec, RoutingSpec

RENAMES = {
    **base.COMMON_LAYER_RENAMES,
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.q_a_proj.weight": "attn.q_a_proj.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn.q_b_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.kv_a_proj.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.kv_b_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate.weight": "moe.router.weight",
    "mlp.gate.e_score_correction_bias": "moe.router.e_score_correction_bias",
    **{
        f"mlp.shared_experts.{p}.weight": f"moe.shared.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    },
}


def mla_attention(config: Mapping[str, Any], *, interleaved: bool) -> AttentionSpec:
    if config.get("attention_bias", False):
        raise InvalidSpec("MLA with attention_bias is not supported")
    nope, rope_dim = base.need(config, "qk_nope_head_dim"), base.need(config, "qk_rope_head_dim")
    rope = base.parse_rope(config, rope_dim, default_theta=10000.0, interleaved=interleaved)
    scale = (nope + rope_dim) ** -0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= base.yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return AttentionSpec(
        kind="mla",
        num_heads=base.need(config, "num_attention_heads"),
        rope=rope,
        softmax_scale=scale,
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=base.need(config, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=base.need(config, "v_head_dim"),
    )


def deepseek_spec(
    config: Mapping[str, Any], family: str, *, routing: RoutingSpec, interleaved: bool
) -> ModelSpec:
    """ModelSpec common to both DeepSeek versions: MoE from layer first_k_dense_replace on."""
    base.check_activation(config)
    if config.get("moe_layer_freq", 1) != 1:
        raise InvalidSpec("moe_layer_freq other than 1 is not supported (transformers ignores it)")
    if config.get("mlp_bias", False):
        raise InvalidSpec("MLP biases are not supported")
    layers = base.need(config, "num_hidden_layers")
    first_dense = config.get("first_k_dense_replace")
    if not isinstance(first_dense, int) or not 0 <= first_dense < layers:
        raise InvalidSpec(f"unsupported first_k_dense_replace {first_dense!r}")
    expert_dim = base.need(config, "moe_intermediate_size")
    shared = int(config.get("n_shared_experts") or 0)
    return ModelSpec(
        family=family,
        **base.common_fields(config, rms_norm_eps=1e-6),
        num_experts=base.need(config, "n_routed_experts"),
        top_k=base.need(config, "num_experts_per_tok"),
        expert_dim=expert_dim,
        moe_layers=tuple(range(first_dense, layers)),
        dense_dim=base.need(config, "intermediate_size"),
        attention=mla_attention(config, interleaved=interleaved),
        routing=routing,
        num_shared_experts=shared,
        shared_expert_dim=shared * expert_dim,
    )
