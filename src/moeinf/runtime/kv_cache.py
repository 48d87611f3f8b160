"""The preallocated key/value cache of one decoding session.

Allocated once for max_seq_len positions; attention writes positions [start, start + T) in place and
reads [0, start + T). GQA layers keep keys and values per kv head; MLA layers keep only the compressed
latent (kv_a output after its norm) and the shared rotary key, as DeepSeek does, so a position costs
C + R numbers instead of H * (2 * hd).

Dimensions: L layers, KV kv heads, S max positions, hd head dim, C kv LoRA rank, R rotary dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeinf.errors import KVCacheDoesNotFit
from moeinf.models.spec import ModelSpec


@dataclass
class GQALayerCache:
    keys: torch.Tensor  # [KV, S, hd]
    values: torch.Tensor  # [KV, S, hd]


@dataclass
class MLALayerCache:
    latent: torch.Tensor  # [S, C]
    rope_key: torch.Tensor  # [S, R]


LayerCache = GQALayerCache | MLALayerCache


def bytes_for(spec: ModelSpec, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes `allocate` would take, without allocating."""
    return max_seq_len * spec.kv_values_per_token * torch.empty(0, dtype=dtype).element_size()


def allocate_within(
    spec: ModelSpec, max_seq_len: int, device: torch.device, dtype: torch.dtype, *, beside: int = 0
) -> list[LayerCache]:
    """`allocate`, but first refused (KVCacheDoesNotFit) when the cache and `beside` bytes still to load
    (the dense weights) exceed the memory available on `device`: zeroed at once, a cache that does not
    fit would swap or get the process killed before the expert budget is even planned."""
    from moeinf.runtime.budget import format_bytes
    from moeinf.runtime.cache_plan import available_memory

    need = bytes_for(spec, max_seq_len, dtype)
    available, what = available_memory(device)
    if need > available - beside:
        left = format_bytes(max(0, available - beside))
        raise KVCacheDoesNotFit(
            f"a context of {max_seq_len} tokens needs {format_bytes(need)} for its KV cache, but only {left} "
            f"of {what} is available beside the dense weights ({format_bytes(beside)}): lower --num-ctx"
        )
    return allocate(spec, max_seq_len, device, dtype)


def allocate(spec: ModelSpec, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> list[LayerCache]:
    """One zeroed cache per layer for `max_seq_len` positions."""
    a = spec.attention
    caches: list[LayerCache] = []
    for _ in range(spec.num_layers):
        if a.kind == "gqa":
            shape = (a.num_kv_heads, max_seq_len, a.head_dim)
            caches.append(
                GQALayerCache(
                    torch.zeros(shape, device=device, dtype=dtype),
                    torch.zeros(shape, device=device, dtype=dtype),
                )
            )
        else:
            caches.append(
                MLALayerCache(
                    torch.zeros(max_seq_len, a.kv_lora_rank, device=device, dtype=dtype),
                    torch.zeros(max_seq_len, a.qk_rope_head_dim, device=device, dtype=dtype),
                )
            )
    return caches


def nbytes(caches: list[LayerCache]) -> int:
    """Bytes held by the cache (for memory planning and `show`)."""
    total = 0
    for c in caches:
        tensors = (c.keys, c.values) if isinstance(c, GQALayerCache) else (c.latent, c.rope_key)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
