"""The canonical tensor names and shapes a ModelSpec implies (torch-free).

`dense_shapes(spec)` is the complete list of dense tensors in `dense.safetensors`; `expert_shapes(spec)`
the three tensors of one routed expert file. Adapters check their renames against it, reshard proves
completeness with it, and the decoder loads by it. D hidden, V vocab, H heads, KV kv heads, hd head
dim, I expert hidden, F dense MLP hidden, S shared-expert hidden, E experts, R/C q/kv LoRA ranks.
"""

from __future__ import annotations

from moeinf.models.spec import ModelSpec

Shape = tuple[int, ...]
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_shapes(spec: ModelSpec) -> dict[str, Shape]:
    d, i = spec.hidden_size, spec.expert_dim
    return {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}


def _mlp(prefix: str, d: int, f: int) -> dict[str, Shape]:
    return {
        f"{prefix}.gate_proj.weight": (f, d),
        f"{prefix}.up_proj.weight": (f, d),
        f"{prefix}.down_proj.weight": (d, f),
    }


def _attention(prefix: str, spec: ModelSpec) -> dict[str, Shape]:
    a, d = spec.attention, spec.hidden_size
    out: dict[str, Shape] = {}
    if a.kind == "gqa":
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        out.update({f"{prefix}.q_proj.weight": (q, d), f"{prefix}.k_proj.weight": (kv, d)})
        out.update({f"{prefix}.v_proj.weight": (kv, d), f"{prefix}.o_proj.weight": (d, q)})
        if a.qkv_bias:
            out.update(
                {
                    f"{prefix}.q_proj.bias": (q,),
                    f"{prefix}.k_proj.bias": (kv,),
                    f"{prefix}.v_proj.bias": (kv,),
                }
            )
        if a.o_bias:
            out[f"{prefix}.o_proj.bias"] = (d,)
        if a.qk_norm == "per_head":
            out.update({f"{prefix}.q_norm.weight": (a.head_dim,), f"{prefix}.k_norm.weight": (a.head_dim,)})
        elif a.qk_norm == "full":
            out.update({f"{prefix}.q_norm.weight": (q,), f"{prefix}.k_norm.weight": (kv,)})
        return out
    q = a.num_heads * a.qk_head_dim
    if a.q_lora_rank is None:
        out[f"{prefix}.q_proj.weight"] = (q, d)
    else:
        r = a.q_lora_rank
        out.update({f"{prefix}.q_a_proj.weight": (r, d), f"{prefix}.q_a_norm.weight": (r,)})
        out[f"{prefix}.q_b_proj.weight"] = (q, r)
    c = a.kv_lora_rank
    out[f"{prefix}.kv_a_proj.weight"] = (c + a.qk_rope_head_dim, d)
    out[f"{prefix}.kv_a_norm.weight"] = (c,)
    out[f"{prefix}.kv_b_proj.weight"] = (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), c)
    out[f"{prefix}.o_proj.weight"] = (d, a.num_heads * a.v_head_dim)
    return out


def dense_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """Every dense canonical tensor name of `spec` with its shape, in a stable order."""
    d, v = spec.hidden_size, spec.vocab_size
    out: dict[str, Shape] = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    for layer in range(spec.num_layers):
        p = f"layers.{layer}"
        out[f"{p}.input_norm.weight"] = (d,)
        out[f"{p}.post_attn_norm.weight"] = (d,)
        out.update(_attention(f"{p}.attn", spec))
        if not spec.is_moe_layer(layer):
            out.update(_mlp(f"{p}.mlp", d, spec.dense_dim))
            continue
        out[f"{p}.moe.router.weight"] = (spec.num_experts, d)
        if spec.routing.correction_bias:
            out[f"{p}.moe.router.e_score_correction_bias"] = (spec.num_experts,)
        if spec.num_shared_experts:
            out.update(_mlp(f"{p}.moe.shared", d, spec.shared_expert_dim))
        if spec.shared_expert_gate:
            out[f"{p}.moe.shared_gate.weight"] = (1, d)
    return out
