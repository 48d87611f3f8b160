"""What every architecture adapter shares: the Adapter protocol, tensor-mapping results, config helpers.

An adapter turns a Hugging Face config.json dict into a ModelSpec and a hub tensor key into a canonical
name. Renames are a table of layer-local suffixes; every result is checked against
`models.weights.dense_shapes(spec)` so an adapter can never invent a name the decoder does not load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

from moeinf.errors import InvalidSpec, UnmappedTensor
from moeinf.models.spec import ModelSpec, RopeSpec
from moeinf.models.weights import EXPERT_PROJS, dense_shapes


class DenseTensor(NamedTuple):
    name: str  # canonical name in dense.safetensors


class ExpertTensor(NamedTuple):
    layer: int
    expert: int
    proj: str  # gate_proj | up_proj | down_proj


class IgnoredTensor(NamedTuple):
    """A checkpoint tensor transformers does not load either (DeepSeek-V3 MTP layers, rotary buffers)."""

    reason: str


Mapped = DenseTensor | ExpertTensor | IgnoredTensor


class Adapter(Protocol):
    family: str

    def spec(self, config: Mapping[str, Any]) -> ModelSpec: ...

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> Mapped: ...


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", **{p: p for p in EXPERT_PROJS}}

COMMON_LAYER_RENAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in EXPERT_PROJS},
}
GQA_RENAMES = {
    **{f"self_attn.{p}_proj.{w}": f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}


def map_standard(hf_key: str, spec: ModelSpec, layer_renames: Mapping[str, str]) -> Mapped:
    """Map a hub key using the common top-level names plus a family's layer-local rename table."""
    if hf_key == "model.embed_tokens.weight":
        return _checked(hf_key, "embed_tokens.weight", spec)
    if hf_key == "model.norm.weight":
        return _checked(hf_key, "norm.weight", spec)
    if hf_key == "lm_head.weight":
        if spec.tie_word_embeddings:
            return IgnoredTensor("lm_head is tied to embed_tokens")
        return _checked(hf_key, "lm_head.weight", spec)
    m = _LAYER.fullmatch(hf_key)
    if m is None:
        raise UnmappedTensor(f"no rule maps checkpoint tensor {hf_key!r}")
    layer, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq"):
        return IgnoredTensor("rotary frequencies are recomputed")
    if layer >= spec.num_layers:
        raise UnmappedTensor(f"checkpoint tensor {hf_key!r} is beyond the model's {spec.num_layers} layers")
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        expert, proj = int(e.group(1)), _EXPERT_PROJ.get(e.group(2))
        if proj is None or expert >= spec.num_experts or not spec.is_moe_layer(layer):
            raise UnmappedTensor(f"checkpoint tensor {hf_key!r} is not a routed expert of this model")
        return ExpertTensor(layer, expert, proj)
    local = layer_renames.get(rest)
    if local is None:
        raise UnmappedTensor(f"no rule maps checkpoint tensor {hf_key!r}")
    return _checked(hf_key, f"layers.{layer}.{local}", spec)


def _checked(hf_key: str, name: str, spec: ModelSpec) -> DenseTensor:
    if name not in _names(spec):
        raise UnmappedTensor(f"checkpoint tensor {hf_key!r} ({name}) does not belong to this model's spec")
    return DenseTensor(name)


_NAME_CACHE: dict[int, tuple[ModelSpec, frozenset[str]]] = {}


def _names(spec: ModelSpec) -> frozenset[str]:
    """dense_shapes keys, memoised per spec object (map_tensor is called once per checkpoint tensor)."""
    hit = _NAME_CACHE.get(id(spec))
    if hit is None or hit[0] is not spec:
        hit = (spec, frozenset(dense_shapes(spec)))
        _NAME_CACHE.clear()
        _NAME_CACHE[id(spec)] = hit
    return hit[1]


# --- config helpers -----------------------------------------------------------------------------


def need(config: Mapping[str, Any], key: str) -> Any:
    """A config value that must be present and not null."""
    value = config.get(key)
    if value is None:
        raise InvalidSpec(f"config.json lacks {key!r}")
    return value


def check_activation(config: Mapping[str, Any]) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise InvalidSpec(f"unsupported activation {act!r} (only silu)")


def common_fields(config: Mapping[str, Any], *, rms_norm_eps: float) -> dict[str, Any]:
    """The ModelSpec fields every family reads the same way (rms_norm_eps: the family's default)."""
    return {
        "vocab_size": need(config, "vocab_size"),
        "hidden_size": need(config, "hidden_size"),
        "num_layers": need(config, "num_hidden_layers"),
        "dtype": checkpoint_dtype(config),
        "max_position_embeddings": need(config, "max_position_embeddings"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "rms_norm_eps": float(config.get("rms_norm_eps", rms_norm_eps)),
    }


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
    """The dtype the checkpoint declares (v5 `dtype`, v4 `torch_dtype`); float32 when absent."""
    return str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")


def parse_rope(
    config: Mapping[str, Any], dim: int, *, default_theta: float, interleaved: bool = False
) -> RopeSpec:
    """RopeSpec from v5 `rope_parameters` or legacy `rope_scaling`/`rope_theta` (as transformers does)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise InvalidSpec("per-layer-type rope parameters are not supported")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise InvalidSpec("partial rotary embeddings are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", config.get("rope_theta") or default_theta))
    if kind != "yarn":
        return RopeSpec(dim=dim, theta=theta, kind=kind, interleaved=interleaved)
    max_pos = need(config, "max_position_embeddings")
    original = (
        config.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings")
        or max_pos
    )
    factor = rope.get("factor") or max_pos / original
    return RopeSpec(
        dim=dim,
        theta=theta,
        kind=kind,
        interleaved=interleaved,
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=rope.get("mscale"),
        mscale_all_dim=rope.get("mscale_all_dim"),
        attention_factor=rope.get("attention_factor"),
        truncate=bool(rope.get("truncate", True)),
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def moe_layers_qwen(config: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    """Qwen2/Qwen3-MoE: MoE unless in mlp_only_layers; else every decoder_sparse_step-th layer."""
    only_mlp = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(num_layers) if i not in only_mlp and (i + 1) % step == 0)
