"""Decode tokens/s with the native kernels on and off, experts all resident or in a budgeted cache.

Builds (once, in --workdir) a synthetic Mixtral-architecture bf16 checkpoint of the S1 shape from
NOTES.md (hidden 768, expert hidden 1152, 32 experts, top-4) with --layers layers, pulls it into a
store there, and replays real routing (../shared/traces/gpt-oss-20b, its first --layers layers) so
the cache sees a real access pattern. Each mode runs in a fresh process (MOEINF_NATIVE is read once):
- torch-resident / native-resident: ResidentProvider, experts converted to fp32 (today's default)
- native-resident-bf16: ResidentProvider keeping the stored bf16 tensors
- {torch,native}-cache-fp32-<pct>: the expert cache with fp32 slots (what cache_plan does today)
- native-cache-bf16-<pct>: the cache with raw bf16 slots (the proposed slot dtype with native on)
All-resident modes (and 100% budgets) load every expert first; then --warmup tokens run untimed and
--tokens tokens are timed, --rounds times (median reported). The machine is shared: expect noise.

    nice -n 19 .venv/bin/python -m scripts.bench_native_decode --workdir /tmp/moeinf-native-bench
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

TRACE = Path("/work/shared/traces/gpt-oss-20b.decode.dev.npz")
MODES = (
    "torch-resident",
    "native-resident",
    "native-resident-bf16",
    "native-cache-bf16-100",
    "torch-cache-fp32-50",
    "native-cache-fp32-50",
    "native-cache-bf16-50",
    "native-cache-bf16-25",
)


def prepare(work: Path, layers: int) -> None:
    from tests.fixtures.checkpoints import build_tokenizer

    from moeinf.bench.synthetic import SyntheticShape, write_synthetic_checkpoint
    from moeinf.pull import pull
    from moeinf.store import Store

    home = work / "home"
    if (home / "models" / "s1").exists():
        return
    tokenizer = work / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tokenizer)
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").exists():
        shape = SyntheticShape(layers=layers, experts=32, top_k=4)
        write_synthetic_checkpoint(checkpoint, shape, tokenizer_dir=tokenizer)
    pull(str(checkpoint), name="s1", store=Store(home))


def run_one(work: Path, mode: str, warmup: int, tokens: int, rounds: int, threads: int) -> dict:
    import torch

    from moeinf import kernels
    from moeinf.runtime.cache_plan import cache_factory
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.routing_hooks import RoutingReplay
    from moeinf.runtime.trace import Trace, read_trace
    from moeinf.store import Store

    parts = mode.split("-")
    provider = None
    if parts[1] == "cache":
        slot_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[parts[2]]
        make = cache_factory(ram_mem=f"{parts[3]}%", policy="lru")

        def provider(stored, device, dtype):
            return make(stored, device, slot_dtype)

    elif len(parts) > 2:  # resident experts kept in the stored dtype (a proposed ResidentProvider option)
        from moeinf.runtime.resident import ResidentProvider

        def provider(stored, device, dtype):
            return ResidentProvider(stored, device, torch.bfloat16)

    engine = Engine.load("s1", store=Store(work / "home"), device="cpu", threads=threads, provider=provider)
    spec = engine.spec
    full = read_trace(TRACE)
    n = len(spec.moe_layers)
    trace = Trace(
        experts=full.experts[:, :n],
        seq_offsets=full.seq_offsets,
        meta={**full.meta, "num_layers": n},
        probs=None if full.probs is None else full.probs[:, :n],
    )
    decoder = engine.decoder
    decoder.set_routing_hook(
        RoutingReplay(trace, num_moe_layers=n, num_experts=spec.num_experts, top_k=spec.top_k)
    )
    if parts[1] == "resident" or parts[-1] == "100":
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

    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(tokens):
            step()
        times.append(time.perf_counter() - start)
    stats = engine.cache_stats()
    engine.close()
    return {
        "mode": mode,
        "kernels": kernels.describe() if kernels.available() else "torch",
        "tokens_per_s": tokens / statistics.median(times),
        "rounds_tokens_per_s": [round(tokens / t, 2) for t in times],
        "hit_rate": stats.get("hit_rate"),
        "moe_layers": n,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeinf-native-bench"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        res = run_one(args.workdir, args.run_one, args.warmup, args.tokens, args.rounds, args.threads)
        print("RESULT " + json.dumps(res))
        return
    prepare(args.workdir, args.layers)
    for mode in args.modes:
        env = {**os.environ, "MOEINF_NATIVE": "0" if mode.startswith("torch") else "1"}
        cmd = [sys.executable, "-m", "scripts.bench_native_decode", "--run-one", mode]
        cmd += ["--workdir", str(args.workdir), "--warmup", str(args.warmup), "--tokens", str(args.tokens)]
        cmd += ["--rounds", str(args.rounds), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        hit = f", hit rate {r['hit_rate']:.2f}" if r["hit_rate"] is not None else ""
        print(
            f"{mode:24s} {r['tokens_per_s']:6.2f} tokens/s (rounds {r['rounds_tokens_per_s']}){hit}",
            flush=True,
        )


if __name__ == "__main__":
    main()
