"""Small building blocks of the decoder: RMSNorm, the SwiGLU MLP, and one expert's SwiGLU on raw tensors.

RMSNorm mirrors transformers' (normalise in fp32, cast back, then scale) so fp32 and half results
match it. Dimensions: T tokens, D hidden, F MLP hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert: x [T, D], gate/up [F, D], down [D, F] -> [T, D]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
