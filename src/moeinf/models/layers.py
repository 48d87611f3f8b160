"""Small building blocks of the decoder: RMSNorm, the SwiGLU MLP, and one expert's SwiGLU on raw tensors.

RMSNorm mirrors transformers' (normalise in fp32, cast back, then scale) so fp32 and half results
match it. Dimensions: T tokens, D hidden, F MLP hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeinf import kernels


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


class Linear(nn.Linear):
    """nn.Linear whose decode-sized CPU products (T <= kernels.MAX_TOKENS) run on the native kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.try_linear(x, self.weight, self.bias)
        if y is not None:
            return y
        if self.weight.dtype != x.dtype:  # half weights kept for the native path, here with more tokens
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return super().forward(x)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inner, bias=False)
        self.up_proj = Linear(hidden, inner, bias=False)
        self.down_proj = Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert: x [T, D], gate/up [F, D], down [D, F] -> [T, D].

    Decode-sized CPU calls run the fused native kernel, which also takes half-precision weights with
    fp32 activations (cache slots kept in the stored dtype); otherwise torch, upcasting such weights.
    """
    y = kernels.try_expert_forward(x, gate, up, down)
    if y is not None:
        return y
    if gate.dtype != x.dtype:
        gate, up, down = gate.to(x.dtype), up.to(x.dtype), down.to(x.dtype)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
