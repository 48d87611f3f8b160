"""The one generic MoE decoder for every supported family, and `load_decoder` from the store.

Built on the meta device, then dense weights (canonical names, models/weights.py) are assigned onto
the target device in the compute dtype: no second copy in RAM. Routed experts come only through an
ExpertProvider. `forward(tokens [T], start_pos)` runs T new tokens at positions start_pos.., writes
the preallocated KV cache and returns fp32 logits.

Dimensions: T tokens, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from moeinf import kernels
from moeinf.errors import ContextTooLong
from moeinf.models.attention import GQAAttention, MLAAttention, causal_mask
from moeinf.models.layers import MLP, Linear, RMSNorm
from moeinf.models.moe import MoEBlock
from moeinf.models.rope import RotaryTable
from moeinf.models.spec import ModelSpec
from moeinf.models.weights import dense_shapes
from moeinf.runtime import kv_cache
from moeinf.runtime.expert_provider import ExpertProvider, HoldingProvider, LookaheadProvider

if TYPE_CHECKING:
    from moeinf.runtime.routing_hooks import RoutingHook


PREFILL_CHUNK = 512  # tokens per prefill pass


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, provider: ExpertProvider) -> None:
        super().__init__()
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = GQAAttention(spec, layer) if spec.attention.kind == "gqa" else MLAAttention(spec, layer)
        self.is_moe = spec.is_moe_layer(layer)
        # (next MoE layer's post-attention norm, its MoE block, its index, provider), set by enable_lookahead.
        self.lookahead: tuple | None = None
        self.lookahead_k = spec.top_k
        self.lookahead_on = True
        if self.is_moe:
            self.moe = MoEBlock(spec, layer, provider, spec.moe_layers.index(layer))
        else:
            self.mlp = MLP(spec.hidden_size, spec.dense_dim)

    def forward(self, x, rotary, start_pos, cache, masks) -> torch.Tensor:
        h = x + self.attn(self.input_norm(x), rotary, start_pos, cache, masks[self.attn.window])
        if self.lookahead is not None and self.lookahead_on and h.shape[0] == 1:
            # Decode: the next MoE layer's router on this residual stream predicts its experts one
            # layer early (a hint for the cache policy; the real routing happens there as usual).
            norm, moe, layer, provider = self.lookahead
            logits = moe.router_logits(norm(h))  # [1, E]
            provider.lookahead(layer, logits.topk(self.lookahead_k, dim=-1).indices[0].tolist())
        ffn = self.moe if self.is_moe else self.mlp
        return h + ffn(self.post_attn_norm(h))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec, provider: ExpertProvider) -> None:
        super().__init__()
        self.spec = spec
        # An explicit (meta) weight skips nn.Embedding's normal_ init, which under the meta device
        # context imports torch's reference-op machinery: 0.7 s of every model load.
        self.embed_tokens = nn.Embedding(
            spec.vocab_size, spec.hidden_size, _weight=torch.empty(spec.vocab_size, spec.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, i, provider) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.max_seq_len = 0
        self.native_decode = False
        # Long prefills run in chunks: attention scores are [H, chunk, S], not [H, T, S].
        self.prefill_chunk = PREFILL_CHUNK

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        dense: Mapping[str, torch.Tensor],
        provider: ExpertProvider,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        max_seq_len: int,
        caches: list[kv_cache.LayerCache] | None = None,
    ) -> Decoder:
        """Decoder on `device` with `dense` (canonical name -> tensor, any device/dtype) assigned; its KV
        cache is `caches` (allocated by the caller for `max_seq_len`) or a new one."""
        if max_seq_len > spec.max_position_embeddings:
            raise ContextTooLong(
                f"a context of {max_seq_len} tokens exceeds the model's limit of "
                f"{spec.max_position_embeddings}"
            )
        device = torch.device(device)
        with torch.device("meta"):
            decoder = cls(spec, provider)
        expected = dense_shapes(spec)
        missing, unexpected = sorted(set(expected) - set(dense)), sorted(set(dense) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"dense weights do not match the spec: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        keep_half = _native_half_weights(decoder, device, dtype)
        state = {}
        for name, tensor in dense.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"dense tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
            wanted = weight_dtype(spec, name, dtype)
            if name in keep_half and tensor.dtype in HALF_DTYPES:
                wanted = tensor.dtype  # the native kernels read it as stored: half the bytes per token
            state[name] = tensor.to(device=device, dtype=wanted)
        if spec.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        decoder.load_state_dict(state, strict=True, assign=True)
        # Decode steps run on the native kernels (half weights kept as stored): see forward.
        decoder.native_decode = any(state[name].dtype in HALF_DTYPES for name in keep_half if name in state)
        for layer in decoder.layers:  # one native call per MoE layer when all its experts are resident
            if layer.is_moe:
                layer.moe.holding = decoder.native_decode and isinstance(provider, HoldingProvider)
        decoder.requires_grad_(False)
        decoder.rotary = RotaryTable(spec.attention.rope, max_seq_len, device, dtype)
        decoder.caches = caches if caches is not None else kv_cache.allocate(spec, max_seq_len, device, dtype)
        decoder.max_seq_len, decoder.device, decoder.dtype = max_seq_len, device, dtype
        return decoder.eval()

    def describe_decode(self) -> str:
        """One line for --verbose: what computes a decode step's products, and in which dtype."""
        if not self.native_decode:
            return f"decode: torch, weights in {str(self.dtype).removeprefix('torch.')}"
        half = [m.weight for m in self.modules() if isinstance(m, Linear) and m.weight.dtype in HALF_DTYPES]
        nbytes = sum(w.numel() * w.element_size() for w in half)
        dtype = str(half[0].dtype).removeprefix("torch.")
        return (
            f"decode: native kernels, {len(half)} projections kept in {dtype} as stored "
            f"({nbytes / 2**20:.1f} MiB read per token), torch single-threaded during decode steps"
        )

    def set_routing_hook(self, hook: RoutingHook | None) -> None:
        """Route every MoE layer's choices through `hook.on_route` (runtime/routing_hooks.py); None: off."""
        for layer in self.layers:
            if layer.is_moe:
                layer.moe.hook = hook
            # Under replay the model's own router does not decide: its early guesses would be noise.
            layer.lookahead_on = hook is None or not hook.replaces_routing

    def enable_lookahead(self, provider: LookaheadProvider) -> None:
        """Give `provider` each decode step's early prediction of the next MoE layer's experts."""
        moe = [i for i, layer in enumerate(self.layers) if layer.is_moe]
        for here, nxt in zip(moe, moe[1:], strict=False):
            target = self.layers[nxt]
            self.layers[here].lookahead = (target.post_attn_norm, target.moe, nxt, provider)

    def reset(self) -> None:
        """Forget the session: the next forward starts at position 0.

        Nothing to clear: attention only reads positions [0, start_pos + T), all written by then.
        """

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Logits fp32 [T, V] (or [1, V] with last_only) for `tokens [T]` at positions start_pos.."""
        t = tokens.shape[0]
        if start_pos < 0 or t < 1:
            raise ValueError(f"bad forward call: {t} tokens at position {start_pos}")
        if start_pos + t > self.max_seq_len:
            raise ContextTooLong(
                f"{start_pos + t} tokens exceed the context length of {self.max_seq_len} "
                "this model was loaded with"
            )
        if t > self.prefill_chunk:
            step = self.prefill_chunk
            chunks = [
                self.forward(tokens[i : i + step], start_pos + i, last_only=last_only)
                for i in range(0, t, step)
            ]
            return chunks[-1] if last_only else torch.cat(chunks)
        if self.native_decode and t <= kernels.MAX_TOKENS:
            with kernels.decode_threads():
                return self._forward(tokens, start_pos, last_only)
        return self._forward(tokens, start_pos, last_only)

    def _forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool) -> torch.Tensor:
        t = tokens.shape[0]
        windows = {layer.attn.window for layer in self.layers}
        masks = {w: causal_mask(start_pos, t, w, self.device) for w in windows}
        x = self.embed_tokens(tokens.to(self.device))  # [T, D]
        for layer, cache in zip(self.layers, self.caches, strict=True):
            x = layer(x, self.rotary, start_pos, cache, masks)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()  # [T, V]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _native_half_weights(decoder: Decoder, device: torch.device, dtype: torch.dtype) -> set[str]:
    """Names of the projection weights to keep in a stored half dtype: on the CPU with fp32 compute
    and the native kernels, decode reads them once per token widened in registers (exact in fp32
    accumulation); prefill upcasts them per call. Tied embeddings stay in the compute dtype."""
    if not kernels.keeps_half(device, dtype):
        return set()
    names = {f"{name}.weight" for name, m in decoder.named_modules() if isinstance(m, Linear)}
    # MLA's absorbed decode multiplies kv_b_proj's weight directly (not through Linear): compute dtype
    names = {name for name in names if not name.endswith(".attn.kv_b_proj.weight")}
    if decoder.spec.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def weight_dtype(spec: ModelSpec, name: str, dtype: torch.dtype) -> torch.dtype:
    """Compute dtype, except routers transformers keeps in fp32 (DeepSeek) and correction biases."""
    if ".moe.router." in name and (spec.routing.logits_fp32 or name.endswith("correction_bias")):
        return torch.float32
    return dtype


class StoredModelLike(Protocol):
    """What load_decoder needs of `moeinf.store.StoredModel`."""

    @property
    def dense_path(self) -> Path: ...

    @property
    def manifest(self): ...


def load_decoder(
    stored_model: StoredModelLike,
    provider: ExpertProvider,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    max_seq_len: int,
    caches: list[kv_cache.LayerCache] | None = None,
) -> Decoder:
    """Decoder for a pulled model: dense.safetensors read tensor by tensor onto `device` (KV cache:
    `caches`, else a new one)."""
    from safetensors import safe_open

    spec: ModelSpec = stored_model.manifest.spec
    device = torch.device(device)
    may_keep_half = kernels.keeps_half(device, dtype)
    dense = {}
    with safe_open(str(stored_model.dense_path), framework="pt") as f:
        # convert tensor by tensor so that at most one file-dtype tensor is alive at a time; half
        # tensors that Decoder.build may keep as stored (projections for the native kernels) wait
        for name in f.keys():
            tensor = f.get_tensor(name)
            keep = may_keep_half and tensor.dtype in HALF_DTYPES
            dense[name] = tensor.to(device) if keep else tensor.to(device, weight_dtype(spec, name, dtype))
    return Decoder.build(
        spec, dense, provider, device=device, dtype=dtype, max_seq_len=max_seq_len, caches=caches
    )
