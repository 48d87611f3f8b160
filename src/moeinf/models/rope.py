"""Rotary position embeddings: inverse frequencies (default and YaRN) and their application.

Frequencies follow transformers' `compute_default_rope_parameters` and `_compute_yarn_parameters`
op for op; cos/sin are tabulated once for every position up to max_seq_len (the same elementwise
products transformers computes per call, so the values are identical). Two layouts:
halves (Llama `rotate_half`) and interleaved pairs (DeepSeek; output de-interleaved as transformers'
`apply_rotary_pos_emb_interleave`, applied to q and k alike so q.k is unchanged).

Dimensions: T tokens, H heads, R rotary dims, P positions.
"""

from __future__ import annotations

import math

import torch

from moeinf.models.spec import RopeSpec


def inv_frequencies(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """Return `(inv_freq [R/2] fp32, attention_factor)` for `rope`."""
    dim, base = rope.dim, rope.theta
    if rope.kind == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(_mscale(factor, rope.mscale) / _mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = _mscale(factor)
    original = rope.original_max_position_embeddings
    low = _correction_dim(rope.beta_fast, dim, base, original)
    high = _correction_dim(rope.beta_slow, dim, base, original)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv, attention_factor


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


class RotaryTable:
    """cos/sin for positions [0, max_seq_len) on the compute device, and their application to q, k."""

    def __init__(self, rope: RopeSpec, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        inv, scale = inv_frequencies(rope)
        freqs = torch.arange(max_seq_len).float()[:, None] * inv[None, :]  # [P, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, R]
        self.interleaved = rope.interleaved
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)  # [P, R]
        self.sin = (emb.sin() * scale).to(device=device, dtype=dtype)  # [P, R]

    def apply(self, q: torch.Tensor, k: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H, R] and k [T, Hk, R] for positions start_pos .. start_pos + T - 1."""
        t = q.shape[0]
        cos = self.cos[start_pos : start_pos + t].unsqueeze(1)  # [T, 1, R]
        sin = self.sin[start_pos : start_pos + t].unsqueeze(1)  # [T, 1, R]
        if self.interleaved:
            half = cos.shape[-1] // 2
            return _rotate_pairs(q, cos[..., :half], sin[..., :half]), _rotate_pairs(
                k, cos[..., :half], sin[..., :half]
            )
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x0, x1), (x2, x3), ... by one frequency each; result laid out [evens | odds]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [T, H, R/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
