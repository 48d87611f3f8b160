"""ModelSpec: the normalised, validated description of one MoE checkpoint's architecture.

Adapters (models/adapters/) turn a Hugging Face config into a ModelSpec; the decoder, the store and
the cache read only this. Frozen, torch-free, validated at construction (an unknown routing or
attention setting is an error), and round-trips through plain dicts (YAML) via to_dict/from_dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moeinf.errors import InvalidSpec

DTYPES = ("bfloat16", "float16", "float32")
ROPE_KINDS = ("default", "yarn")
ATTENTION_KINDS = ("gqa", "mla")
QK_NORMS = ("none", "per_head", "full")
SCORINGS = ("softmax", "sigmoid")
GROUP_SCORINGS = ("max", "top2_sum")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSpec(message)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding over the first `dim` dims of a head (MLA: the decoupled rope part).

    `interleaved`: rotate pairs (x0, x1), (x2, x3), ... (DeepSeek) instead of halves (Llama style).
    YaRN fields follow transformers' `_compute_yarn_parameters`; None means "not given".
    """

    dim: int
    theta: float
    kind: str = "default"
    interleaved: bool = False
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _require(self.kind in ROPE_KINDS, f"unsupported rope type {self.kind!r} (supported: {ROPE_KINDS})")
        _require(self.dim > 0 and self.dim % 2 == 0, f"rope dim must be even and positive, got {self.dim}")
        _require(self.theta > 0, f"rope theta must be positive, got {self.theta}")
        if self.kind == "yarn":
            _require(self.factor > 0, f"yarn factor must be positive, got {self.factor}")
            _require(
                self.original_max_position_embeddings is not None,
                "yarn rope needs original_max_position_embeddings",
            )


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention of every layer. GQA uses num_kv_heads/head_dim; MLA uses the *_rank/*_head_dim fields.

    `softmax_scale` already includes YaRN's mscale_all_dim correction (DeepSeek). `sliding_layers`
    lists the layers that use the sliding window (empty when `sliding_window` is None).
    """

    kind: str
    num_heads: int
    rope: RopeSpec
    softmax_scale: float
    num_kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        _require(self.kind in ATTENTION_KINDS, f"unsupported attention kind {self.kind!r}")
        _require(self.num_heads > 0, "num_heads must be positive")
        _require(self.qk_norm in QK_NORMS, f"unsupported q/k norm {self.qk_norm!r} (supported: {QK_NORMS})")
        _require(
            self.clip_qkv is None or self.clip_qkv > 0, f"clip_qkv must be positive, got {self.clip_qkv}"
        )
        _require(
            self.sliding_window is None or self.sliding_window > 0,
            f"sliding_window must be positive, got {self.sliding_window}",
        )
        _require(
            self.sliding_window is not None or not self.sliding_layers, "sliding layers without a window"
        )
        if self.kind == "gqa":
            _require(self.num_kv_heads > 0 and self.head_dim > 0, "GQA needs num_kv_heads and head_dim")
            _require(
                self.num_heads % self.num_kv_heads == 0,
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
            )
            _require(self.rope.dim == self.head_dim, "GQA rope must cover the whole head")
        else:
            _require(self.kv_lora_rank > 0, "MLA needs kv_lora_rank")
            _require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or None")
            _require(
                self.qk_nope_head_dim > 0 and self.qk_rope_head_dim > 0 and self.v_head_dim > 0,
                "MLA needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim",
            )
            _require(self.rope.dim == self.qk_rope_head_dim, "MLA rope must cover qk_rope_head_dim")
            _require(self.qk_norm == "none" and self.clip_qkv is None, "MLA has no q/k norm or clipping")
            _require(not self.qkv_bias and not self.o_bias, "MLA with attention bias is not supported")

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim if self.kind == "gqa" else self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class RoutingSpec:
    """How a token picks its experts; the arguments of `models.routing.route` (top_k is ModelSpec's).

    `group_scoring` is None without group-limited selection; "max" (DeepSeek-V2 group_limited_greedy)
    or "top2_sum" (DeepSeek-V3 noaux_tc, selection on scores + correction bias).
    `logits_fp32`: the router matmul runs in fp32 whatever the compute dtype (DeepSeek).
    """

    scoring: str = "softmax"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_scoring: str | None = None
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    logits_fp32: bool = False

    def __post_init__(self) -> None:
        _require(self.scoring in SCORINGS, f"unsupported router scoring {self.scoring!r}")
        _require(
            self.group_scoring is None or self.group_scoring in GROUP_SCORINGS,
            f"unsupported group scoring {self.group_scoring!r}",
        )
        _require(
            self.n_group >= 1 and 1 <= self.topk_group <= self.n_group, "need 1 <= topk_group <= n_group"
        )
        _require(self.routed_scaling_factor > 0, "routed_scaling_factor must be positive")


@dataclass(frozen=True)
class ModelSpec:
    """One MoE model. D = hidden_size, I = expert_dim, E = num_experts, K = top_k.

    `dense_dim`: hidden size of the dense MLP layers (layers not in moe_layers). Shared experts
    (DeepSeek, Qwen2-MoE) form one MLP of hidden `shared_expert_dim`; Qwen2-MoE gates it with a sigmoid.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    expert_dim: int
    moe_layers: tuple[int, ...]
    dense_dim: int
    dtype: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    rms_norm_eps: float
    attention: AttentionSpec
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    num_shared_experts: int = 0
    shared_expert_dim: int = 0
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_experts", "top_k", "expert_dim"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(self.dtype in DTYPES, f"unsupported dtype {self.dtype!r} (supported: {DTYPES})")
        _require(self.top_k <= self.num_experts, f"top_k {self.top_k} > num_experts {self.num_experts}")
        _require(
            list(self.moe_layers) == sorted(set(self.moe_layers))
            and all(0 <= i < self.num_layers for i in self.moe_layers),
            f"moe_layers must be sorted distinct layer indices, got {self.moe_layers}",
        )
        _require(bool(self.moe_layers), "a MoE model needs at least one MoE layer")
        _require(
            len(self.moe_layers) == self.num_layers or self.dense_dim > 0, "dense layers need dense_dim > 0"
        )
        _require(
            (self.num_shared_experts > 0) == (self.shared_expert_dim > 0),
            "num_shared_experts and shared_expert_dim must both be set or both zero",
        )
        _require(
            not self.shared_expert_gate or self.num_shared_experts > 0, "shared gate without shared expert"
        )
        r = self.routing
        _require(
            self.num_experts % r.n_group == 0, f"num_experts {self.num_experts} not divisible by n_group"
        )
        if r.group_scoring is not None:
            per_group = self.num_experts // r.n_group
            _require(
                r.topk_group * per_group >= self.top_k, "topk_group groups hold fewer experts than top_k"
            )
            _require(r.group_scoring != "top2_sum" or per_group >= 2, "top2_sum needs >= 2 experts per group")
        _require(all(0 <= i < self.num_layers for i in self.attention.sliding_layers), "bad sliding layer")

    @property
    def expert_params(self) -> int:
        """Weights in one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.expert_dim

    @property
    def kv_values_per_token(self) -> int:
        """Numbers the KV cache keeps per position, all layers: keys and values per kv head (GQA) or the
        compressed latent and the shared rotary key (MLA)."""
        a = self.attention
        per_layer = (
            2 * a.num_kv_heads * a.head_dim if a.kind == "gqa" else a.kv_lora_rank + a.qk_rope_head_dim
        )
        return self.num_layers * per_layer

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (tuples become lists) for YAML."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of to_dict; unknown keys are an error (a newer store format)."""
        try:
            attention = dict(data["attention"])
            attention["rope"] = RopeSpec(**attention["rope"])
            attention["sliding_layers"] = tuple(attention.get("sliding_layers", ()))
            fields = dict(data)
            fields["attention"] = AttentionSpec(**attention)
            fields["routing"] = RoutingSpec(**data.get("routing", {}))
            fields["moe_layers"] = tuple(data["moe_layers"])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise InvalidSpec(f"malformed model spec: {exc}") from exc
