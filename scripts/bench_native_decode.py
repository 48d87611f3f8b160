"""Decode tokens/s with the native kernels on and off, all experts resident or in a budgeted cache.

Runs a model already in the store (default `s1-hf`, built by scripts/build_s1_transformers.py: the
issue-6 model S1, bf16) with routing replayed from ../shared/traces/gpt-oss-20b (its first layers),
so the cache sees a real access pattern. Each mode runs in a fresh process (MOEINF_NATIVE is read once):
- native-cache-bf16-<pct>: the expert cache with raw bf16 slots, bf16 dense projections, native kernels
  (what `moeinf run` does on a CPU with a C compiler)
- torch-cache-fp32-<pct>: MOEINF_NATIVE=0: fp32 slots and dense weights, torch for every product
100% budgets load every expert before timing (all-resident); then --warmup tokens run untimed and
--tokens tokens are timed, --rounds times (median reported); lower budgets read misses from the store
with direct I/O. The machine may be shared: expect noise, compare modes of one run.

    nice -n 5 .venv/bin/python -m scripts.bench_native_decode [--model s1-hf] [--policy lru|trace|oracle]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRACE = Path("/work/shared/traces/gpt-oss-20b.decode.dev.npz")
MODES = (
    "native-cache-bf16-100",
    "torch-cache-fp32-100",
    "native-cache-bf16-50",
    "torch-cache-fp32-50",
    "native-cache-bf16-25",
    "torch-cache-fp32-25",
)


def run_one(
    model: str, mode: str, policy: str, warmup: int, tokens: int, rounds: int, threads: int, ahead: int
) -> dict:
    import torch

    from moeinf import kernels
    from moeinf.runtime.cache_plan import cache_factory
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.routing_hooks import HookChain, RoutingReplay
    from moeinf.runtime.trace import Trace, read_trace
    from moeinf.store import Store

    _, _, dtype, pct = mode.split("-")
    slot_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    full = read_trace(TRACE)
    spec = Store().open(model).manifest.spec
    n = len(spec.moe_layers)
    trace = Trace(
        experts=full.experts[:, :n],
        seq_offsets=full.seq_offsets,
        meta={**full.meta, "num_layers": n},
        probs=None if full.probs is None else full.probs[:, :n],
    )
    oracle = None
    if policy == "oracle":  # Belady's MIN, told the rows the replay will route (one per step, from 0)
        from moeinf.runtime.oracle import ReplayOracle

        oracle = ReplayOracle(trace.experts, trace.num_experts, prefetch_layers=ahead)
        oracle.plan(np.arange(warmup + rounds * tokens), spec.moe_layers)
    make = cache_factory(ram_mem=f"{pct}%", policy=policy, policy_object=oracle)

    def provider(stored, device, dtype):
        return make(stored, device, slot_dtype)

    engine = Engine.load(model, device="cpu", threads=threads, provider=provider)
    decoder = engine.decoder
    replay = RoutingReplay(trace, num_moe_layers=n, num_experts=spec.num_experts, top_k=spec.top_k)
    decoder.set_routing_hook(HookChain([replay, oracle]) if oracle is not None else replay)
    if pct == "100":
        for layer in spec.moe_layers:  # all experts in RAM before timing: no disk reads in the rounds
            for _ in engine.provider.experts(layer, list(range(spec.num_experts))):
                pass
    token = torch.tensor([1])
    pos = 0

    def step() -> None:
        nonlocal pos, token
        logits = decoder.forward(token, pos)
        token = logits[-1:].argmax(-1)
        pos += 1

    def fetches() -> int:
        stats = engine.cache_stats()
        return stats.get("misses", 0) + stats.get("prefetch_issued", 0)

    for _ in range(warmup):
        step()
    before = fetches()
    stalled = engine.cache_stats().get("stall_s", 0.0)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(tokens):
            step()
        times.append(time.perf_counter() - start)
    fetched = fetches() - before
    stats = engine.cache_stats()
    stalled = stats.get("stall_s", 0.0) - stalled
    engine.close()
    return {
        "mode": mode,
        "kernels": kernels.describe() if kernels.available() else "torch",
        "tokens_per_s": tokens / statistics.median(times),
        "rounds_tokens_per_s": [round(tokens / t, 2) for t in times],
        "hit_rate": stats.get("hit_rate"),
        "moe_layers": n,
        "fetches_per_token": fetched / (rounds * tokens),
        "stall_ms_per_token": 1000 * stalled / (rounds * tokens),  # waiting for reads, in timed rounds
        "dense_dtype": str(decoder.layers[0].attn.q_proj.weight.dtype),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="s1-hf")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument(
        "--oracle-prefetch", type=int, default=0, help="--policy oracle: read N layer steps ahead"
    )
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        res = run_one(
            args.model,
            args.run_one,
            args.policy,
            args.warmup,
            args.tokens,
            args.rounds,
            args.threads,
            args.oracle_prefetch,
        )
        print("RESULT " + json.dumps(res))
        return
    for mode in args.modes:
        env = {**os.environ, "MOEINF_NATIVE": "0" if mode.startswith("torch") else "1"}
        cmd = [sys.executable, "-m", "scripts.bench_native_decode", "--run-one", mode, "--model", args.model]
        cmd += ["--policy", args.policy, "--warmup", str(args.warmup), "--tokens", str(args.tokens)]
        cmd += ["--rounds", str(args.rounds), "--threads", str(args.threads)]
        cmd += ["--oracle-prefetch", str(args.oracle_prefetch)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        hit = f", hit rate {r['hit_rate']:.2f}" if r["hit_rate"] is not None else ""
        print(
            f"{mode:24s} {r['tokens_per_s']:6.2f} tokens/s (rounds {r['rounds_tokens_per_s']}){hit}, "
            f"{r['fetches_per_token']:.1f} fetches/token, stalled {r['stall_ms_per_token']:.1f} ms/token, "
            f"dense {r['dense_dtype']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
