"""Torch-facing API of the native kernels: checks, dtype dispatch, output allocation, thread count.

`linear` and `expert_forward` take fp32 activations and fp32 / bf16 / f16 weights on the CPU and
accumulate in fp32. `accepts(...)` is the dispatch predicate callers use to choose between these and
torch: small token counts only (decode; prefill and large batches are compute bound and BLAS wins).
The kernels use torch.get_num_threads() threads unless told otherwise and run while torch's own pool
is idle (a call returns only when its threads are done); a decode step runs inside `decode_threads()`,
which makes torch single-threaded so that its spinning OpenMP workers leave the cores to ours.

Dimensions: T tokens, K input features, N output features, D hidden, I expert hidden.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from moeinf.kernels.build import Native, load, reason

MAX_TOKENS = 8  # above this, torch (BLAS) is the faster path
ExpertLike = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (gate [I, D], up [I, D], down [D, I])
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {1: "unsupported weight dtype", 2: "bad shape", 3: "out of memory"}
# The decode path (try_*) takes half-precision weights only: torch reads fp32 weights at full memory
# bandwidth here, and measured faster than these kernels at 2 threads on an idle machine (a ~1 GB
# fp32 model: 60 vs 36 tokens/s, scripts/bench_vs_transformers.py); bf16/f16 are where torch is slow.
_DECODE_DTYPES = {dtype: code for dtype, code in _DTYPES.items() if dtype != torch.float32}
_threads_setting: int | None = None  # inside decode_threads(); None: follow torch.get_num_threads()


def available() -> bool:
    return load() is not None


def keeps_half(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether bf16/f16 weights stay as stored on `device` with this compute dtype: CPU, fp32
    activations and the kernels built (they widen half weights in registers; torch would need copies)."""
    return device.type == "cpu" and compute_dtype == torch.float32 and available()


def describe() -> str:
    """One line for --verbose: which path computes the products, and why."""
    native = load()
    if native is None:
        return f"CPU kernels: torch (native kernels unavailable: {reason()})"
    isa = "AVX2+FMA+F16C" if native.lib.mk_simd() else "portable scalar"
    return f"CPU kernels: native {isa}, {reason()} ({native.path})"


def set_simd(enabled: bool) -> bool:
    """Force the scalar path (False) or the best one the CPU has (True); returns whether SIMD is on."""
    return bool(_lib().lib.mk_set_simd(int(enabled)))


@contextmanager
def decode_threads() -> Iterator[None]:
    """Run a decode step: torch single-threaded, the kernels on the threads torch had.

    Decode on the native path leaves torch only small ops (norms, rope, attention over one query).
    torch's OpenMP workers spin for a while after each parallel region and would take the cores
    from the kernels' workers on a small machine (measured on 2 cores: 90 -> 72 ms per token).
    """
    global _threads_setting
    before, n = _threads_setting, torch.get_num_threads()
    _threads_setting = before if before is not None else n
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _threads_setting = before
        if n > 1:
            torch.set_num_threads(n)


def accepts(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when the native kernels can compute with these tensors and should (small T on CPU)."""
    if not x.is_cpu or x.dtype != torch.float32 or x.dim() < 1:
        return False
    if x.numel() > MAX_TOKENS * x.shape[-1] or not available():
        return False
    dtype = weights[0].dtype
    return all(w.device.type == "cpu" and w.dtype == dtype and w.is_contiguous() for w in weights) and (
        dtype in _DTYPES
    )


def try_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x W^T + bias on the native kernels when they apply (`accepts`), else None: use torch.

    The decode-path entry: one pass of cheap checks, no exceptions (a Python-level call costs ~10 us,
    comparable to a small product).
    """
    code = _DECODE_DTYPES.get(weight.dtype)
    if code is None or x.dtype != torch.float32 or not x.is_cpu or not weight.is_cpu:
        return None
    if weight.dim() != 2 or not weight.is_contiguous() or x.dim() < 1:
        return None
    n, k = weight.shape
    if k == 0 or x.shape[-1] != k or x.numel() > MAX_TOKENS * k:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # no autograd through the kernels: torch keeps training correct
    native = load()
    if native is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    rc = native.lib.mk_linear(
        x.data_ptr(),
        x.numel() // k,
        k,
        weight.data_ptr(),
        code,
        n,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        _threads(None),
    )
    _raise_for(rc)
    return y


def try_expert_forward(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor | None:
    """One SwiGLU expert on the native kernels when they apply (`accepts`), else None: use torch."""
    code = _DECODE_DTYPES.get(gate.dtype)
    if code is None or x.dtype != torch.float32 or not x.is_cpu or x.dim() < 1:
        return None
    if not (gate.dtype == up.dtype == down.dtype) or not gate.is_cpu:
        return None
    if not (gate.is_contiguous() and up.is_contiguous() and down.is_contiguous()) or gate.dim() != 2:
        return None
    i, d = gate.shape
    if d == 0 or x.shape[-1] != d or x.numel() > MAX_TOKENS * d or up.shape != gate.shape:
        return None
    if down.shape != (d, i) or not up.is_cpu or not down.is_cpu:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, up, down)):
        return None  # no autograd through the kernels
    native = load()
    if native is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    rc = native.lib.mk_expert_forward(
        x.data_ptr(),
        x.numel() // d,
        d,
        i,
        gate.data_ptr(),
        up.data_ptr(),
        down.data_ptr(),
        code,
        None,
        0,
        y.data_ptr(),
        _threads(None),
    )
    _raise_for(rc)
    return y


MAX_FUSED_EXPERTS = 64  # MK_MAX_EXPERTS


def try_moe_forward(
    x: torch.Tensor, experts: Sequence[ExpertLike], scales: torch.Tensor
) -> torch.Tensor | None:
    """One token's routed experts in one call: sum over e, in the given order, of scales[e] *
    down_e(silu(x gate_e^T) * (x up_e^T)); x [1, D] fp32, scales [n] fp32. None when the kernels do
    not apply (use the expert-at-a-time path). Bit for bit equal to `try_expert_forward` per expert,
    times its scale, summed from zero in the same order (the kernel keeps those roundings)."""
    n = len(experts)
    if n == 0 or n > MAX_FUSED_EXPERTS or x.dim() != 2 or x.shape[0] != 1 or x.dtype != torch.float32:
        return None
    gate0 = experts[0][0]
    code = _DECODE_DTYPES.get(gate0.dtype)
    if code is None or not x.is_cpu or gate0.dim() != 2 or scales.dtype != torch.float32:
        return None
    i, d = gate0.shape
    if d == 0 or x.shape[1] != d or scales.numel() != n:
        return None
    for gate, up, down in experts:
        if not (gate.dtype == up.dtype == down.dtype == gate0.dtype) or not gate.is_cpu:
            return None
        if gate.shape != (i, d) or up.shape != (i, d) or down.shape != (d, i):
            return None
        if not (gate.is_contiguous() and up.is_contiguous() and down.is_contiguous()):
            return None
    native = load()
    if native is None:
        return None
    x = x.contiguous()
    scales = scales.contiguous()
    pointers = ctypes.c_void_p * n
    y = torch.empty((1, d), dtype=torch.float32)
    rc = native.lib.mk_moe_forward(
        x.data_ptr(),
        d,
        i,
        n,
        pointers(*(e[0].data_ptr() for e in experts)),
        pointers(*(e[1].data_ptr() for e in experts)),
        pointers(*(e[2].data_ptr() for e in experts)),
        code,
        scales.data_ptr(),
        y.data_ptr(),
        _threads(None),
    )
    _raise_for(rc)
    return y


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """x [..., K] fp32 @ weight [N, K]^T + bias [N] -> [..., N] fp32 (like F.linear)."""
    native = _lib()
    n, k = weight.shape
    _check_weight(weight, "weight")
    x2 = _activations(x, k)  # [T, K]
    t = x2.shape[0]
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
        if bias.shape != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({n},)")
    y = _output(out, (*x.shape[:-1], n))
    rc = native.lib.mk_linear(
        x2.data_ptr(),
        t,
        k,
        weight.data_ptr(),
        _DTYPES[weight.dtype],
        n,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        _threads(threads),
    )
    _raise_for(rc)
    return y


def expert_forward(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    threads: int | None = None,
) -> torch.Tensor:
    """One SwiGLU expert: down(silu(x gate^T) * (x up^T)), x [T, D], gate/up [I, D], down [D, I].

    With `scale` [T] each token's result is multiplied by it (the routing weight); with
    `accumulate` it is added to `out` (which must then be given) instead of overwriting it.
    """
    native = _lib()
    i, d = gate.shape
    if up.shape != (i, d) or down.shape != (d, i):
        shapes = f"gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}"
        raise ValueError(f"expert shapes do not fit: {shapes}")
    if not gate.dtype == up.dtype == down.dtype:
        raise ValueError("gate, up and down must share one dtype")
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        _check_weight(w, name)
    x2 = _activations(x, d)  # [T, D]
    t = x2.shape[0]
    if accumulate and out is None:
        raise ValueError("accumulate=True needs out=")
    if scale is not None:
        scale = scale.to(torch.float32).reshape(-1).contiguous()
        if scale.numel() != t:
            raise ValueError(f"scale has {scale.numel()} values for {t} tokens")
    y = _output(out, (*x.shape[:-1], d))
    rc = native.lib.mk_expert_forward(
        x2.data_ptr(),
        t,
        d,
        i,
        gate.data_ptr(),
        up.data_ptr(),
        down.data_ptr(),
        _DTYPES[gate.dtype],
        None if scale is None else scale.data_ptr(),
        int(accumulate),
        y.data_ptr(),
        _threads(threads),
    )
    _raise_for(rc)
    return y


def _lib() -> Native:
    native = load()
    if native is None:
        raise RuntimeError(f"native kernels unavailable: {reason()}")
    return native


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.device.type != "cpu" or w.dtype not in _DTYPES or w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"{name}: need a contiguous 2-D CPU fp32/bf16/f16 tensor, got {w.dtype} {w.device}")


def _activations(x: torch.Tensor, k: int) -> torch.Tensor:
    if not x.is_cpu or x.dtype != torch.float32:
        raise ValueError(f"activations must be fp32 on the CPU, got {x.dtype} {x.device}")
    if x.shape[-1] != k:
        raise ValueError(f"activations have {x.shape[-1]} features, weights {k}")
    return x.reshape(-1, k).contiguous()


def _output(out: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    fits = tuple(out.shape) == shape and out.dtype == torch.float32 and out.device.type == "cpu"
    if not fits or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 CPU tensor of shape {shape}")
    return out


def _threads(threads: int | None) -> int:
    if threads is None:
        threads = _threads_setting if _threads_setting is not None else torch.get_num_threads()
    return max(1, threads)


def _raise_for(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"native kernel failed: {_ERRORS.get(rc, rc)}")
