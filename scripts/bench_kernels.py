"""Weights read per second by the native kernels versus torch, and a memory-bandwidth probe.

Decode at batch 1 is bound by reading weights, so the figure of merit is GB/s of weights read.
- probe: torch sum over a buffer far larger than the caches (read bandwidth with all threads)
- expert: one SwiGLU expert (D=768, I=1152 by default) per call, rotating over --experts experts so
  that weights come from DRAM (make experts x expert size exceed the last-level cache)
- matvec: lm_head-sized x W^T ([1, 768] x [32000, 768]) and [1, 2048] x [7168, 2048]
Each measurement is repeated --rounds times, native and torch taking turns within a round so both see
the same load; the median round is reported (the machine is shared: expect noise). Native calls run as
in a decode step (`kernels.decode_threads()`: torch single-threaded, the kernels on its threads).

    nice -n 19 .venv/bin/python scripts/bench_kernels.py [--experts 64] [--rounds 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moeinf import kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def median_seconds(fn, calls: int, rounds: int) -> float:
    """Median over rounds of the mean time per call."""
    return interleaved({"x": fn}, calls, rounds)["x"]


def interleaved(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean time per call of each fn, the fns taking turns within a round
    so that all of them see the same load on a shared machine."""
    for fn in fns.values():
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for i in range(calls):
                fn(i)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def probe(rounds: int) -> float:
    buf = torch.ones(256 * 2**20, dtype=torch.float32)  # 1 GiB
    return buf.numel() * 4 / median_seconds(lambda i: buf.sum(), 1, rounds) / 1e9


def bench_expert(dtype: torch.dtype, d: int, i: int, n: int, tokens: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    experts = [
        (
            (torch.randn(i, d, generator=g) * 0.02).to(dtype),
            (torch.randn(i, d, generator=g) * 0.02).to(dtype),
            (torch.randn(d, i, generator=g) * 0.02).to(dtype),
        )
        for _ in range(n)
    ]
    x = torch.randn(tokens, d, generator=g)  # [T, D]
    x_t = x.to(dtype)  # torch computes in the weights' dtype (as NOTES.md measured it)
    out = torch.empty(tokens, d)
    nbytes = 3 * d * i * experts[0][0].element_size()

    def native(k: int) -> None:
        with kernels.decode_threads():  # as in a decode step: torch's spinning pool off our cores
            kernels.expert_forward(x, *experts[k % n], out=out)

    def torch_path(k: int) -> None:
        gate, up, down = experts[k % n]
        F.linear(F.silu(F.linear(x_t, gate)) * F.linear(x_t, up), down)

    res = interleaved({"native": native, "torch": torch_path}, n, rounds)
    return res | {name + "_gbs": nbytes / s / 1e9 for name, s in res.items()}


def bench_matvec(dtype: torch.dtype, n_out: int, k: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    copies = max(1, (512 * 2**20) // (n_out * k * torch.empty(0, dtype=dtype).element_size()))
    weights = [(torch.randn(n_out, k, generator=g) * 0.02).to(dtype) for _ in range(copies)]
    x = torch.randn(1, k, generator=g)
    x_t = x.to(dtype)
    out = torch.empty(1, n_out)
    nbytes = weights[0].numel() * weights[0].element_size()

    def native(c: int) -> None:
        with kernels.decode_threads():
            kernels.linear(x, weights[c % copies], out=out)

    res = interleaved(
        {
            "native": native,
            "torch": lambda c: F.linear(x_t, weights[c % copies]),
        },
        copies,
        rounds,
    )
    return res | {name + "_gbs": nbytes / s / 1e9 for name, s in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--expert-dim", type=int, default=1152)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(kernels.describe())
    print(f"threads {torch.get_num_threads()}, rounds {args.rounds} (median), torch {torch.__version__}")
    print(f"probe: torch sum over 1 GiB fp32: {probe(args.rounds):.1f} GB/s")
    d, i = args.hidden, args.expert_dim
    for name in args.dtypes:
        dtype = DTYPES[name]
        for t in args.tokens:
            r = bench_expert(dtype, d, i, args.experts, t, args.rounds)
            print(
                f"expert {name} D={d} I={i} T={t} over {args.experts} experts: "
                f"native {r['native'] * 1e3:.3f} ms ({r['native_gbs']:.1f} GB/s)  "
                f"torch {r['torch'] * 1e3:.3f} ms ({r['torch_gbs']:.1f} GB/s)  "
                f"speed-up {r['torch'] / r['native']:.2f}x"
            )
        for n_out, k in ((32000, d), (7168, 2048)):
            r = bench_matvec(dtype, n_out, k, args.rounds)
            print(
                f"matvec {name} [1, {k}] x [{n_out}, {k}]^T: "
                f"native {r['native'] * 1e3:.3f} ms ({r['native_gbs']:.1f} GB/s)  "
                f"torch {r['torch'] * 1e3:.3f} ms ({r['torch_gbs']:.1f} GB/s)  "
                f"speed-up {r['torch'] / r['native']:.2f}x"
            )


if __name__ == "__main__":
    main()
