"""Guard for simulator / policy speed work: fetch counts and fetch order must not change (issue 8).

Replays a fixed slice of a routing trace through lru, lfu, trace (library and routing statistics from
another fixed slice, as in scripts/evaluate_policies.py) and oracle at 12.5 / 25 / 50% capacity and
prints, per run, fetches, demand misses, bypasses, wasted prefetches and a hash of the whole fetch
sequence, plus trace tokens per CPU second.
`--record FILE` saves them; `--check FILE` compares against a recording and exits 1 on any change.

    nice -n 19 .venv/bin/python scripts/check_policy_fetches.py \
        /work/shared/traces/gpt-oss-20b.decode.dev.npz --check scripts/check_policy_fetches.expected.json

The expected file was recorded before the simulator speed work (8e82509) for lru, lfu and oracle, and
at 35ee579 for trace (whose predictions changed on purpose in 338ff39), then re-recorded for trace
only when it gained the cross-token predictor (issue 8; lru, lfu and oracle unchanged) and when its
defaults changed (bypass margin 0, prefetch threshold 0.8, re-match every 32 tokens; fourth session).
The policies' C cores (runtime/policy_core.py) were checked identical against the earlier recording.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from moeinf.bench.simulator import make_sim_policy, simulate
from moeinf.runtime.routing_counts import routing_statistics
from moeinf.runtime.trace import read_trace
from moeinf.runtime.trace_library import TraceLibrary


def run(trace_path: str, requests: int, library_requests: int, policies: list[str], caps: list[float]):
    trace = read_trace(trace_path)
    test = trace.select(list(range(requests)))
    library_trace = trace.select(list(range(requests, requests + library_requests)))
    routing = routing_statistics(library_trace)
    out = {}
    for cap in caps:
        for name in policies:
            options = {}
            if name == "trace":
                options = {"library": TraceLibrary.from_trace(library_trace), "routing": routing}
            policy = make_sim_policy(name, test, **options)
            digest = hashlib.sha256()

            def on_fetch(key, prefetch, digest=digest):
                digest.update(b"%d,%d,%d;" % (key[0], key[1], prefetch))

            r = simulate(test, policy, capacity=cap, on_fetch=on_fetch)
            row = {
                "fetches": r.fetches,
                "demand_misses": r.demand_misses,
                "bypasses": r.bypasses,
                "prefetches_issued": r.prefetches_issued,
                "prefetches_wasted": r.prefetches_wasted,
                "time_ms": round(r.time_ms, 3),
                "sequence": digest.hexdigest()[:16],
            }
            out[f"{name}@{cap}"] = row
            speed = r.tokens / r.cpu_s if r.cpu_s > 0 else 0.0
            print(f"{name:6s} {cap:5.3f} {row} {speed:.0f} tok/cpu-s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--requests", type=int, default=120, help="replayed: the trace's first N requests")
    ap.add_argument("--library-requests", type=int, default=120, help="library: the next N requests")
    ap.add_argument("--policies", default="lru,lfu,trace,oracle")
    ap.add_argument("--capacities", default="0.125,0.25,0.5")
    ap.add_argument("--record", default=None)
    ap.add_argument("--check", default=None)
    args = ap.parse_args()
    caps = [float(c) for c in args.capacities.split(",")]
    got = run(args.trace, args.requests, args.library_requests, args.policies.split(","), caps)
    if args.record:
        with open(args.record, "w") as fh:
            json.dump(got, fh, indent=1, sort_keys=True)
    if args.check:
        with open(args.check) as fh:
            want = json.load(fh)
        bad = [k for k in got if k in want and want[k] != got[k]]
        for k in bad:
            print(f"CHANGED {k}: {want[k]} -> {got[k]}")
        print("identical" if not bad else f"{len(bad)} runs changed")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
