"""Evaluate cache policies on a routing trace with k-fold splits over requests (issue 8).

For each fold, the requests of that fold are replayed through every policy; the `trace` policy's
library is pre-loaded from the other folds only, with the token-level routing statistics of those
folds (`routing_statistics`); it learns online from the evaluated requests as they finish, as at run
time (a request is always replayed before it can be in the library). Fetches
per token and modelled time per token are summed over folds; per-fold ratios to the oracle show the
spread. Usage (reproduces BENCHMARKS.md, "Policy simulator (issue 8)"):

    nice -n 19 .venv/bin/python scripts/evaluate_policies.py \
        /work/shared/traces/gpt-oss-20b.decode.dev.npz --folds 5 --out policy_eval.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Iterator

import numpy as np

from moeinf.bench.simulator import make_sim_policy, simulate
from moeinf.runtime.routing_counts import RoutingStats, routing_statistics
from moeinf.runtime.trace import Trace, read_trace
from moeinf.runtime.trace_library import TraceLibrary

TIME_MODELS = {"pcie": (0.5, 14.0), "ssd": (0.5, 120.0)}  # (compute ms per layer, transfer ms per expert)


def fold_splits(
    trace: Trace, folds: int, seed: int, requests: int | None = None
) -> Iterator[tuple[int, Trace, RoutingStats, TraceLibrary]]:
    """Each fold's (index, its requests, the routing statistics and the trace library of all other
    folds' requests). The library is copied for every run: a policy learns into it."""
    n = trace.num_requests if requests is None else min(requests, trace.num_requests)
    order = np.random.default_rng(seed).permutation(trace.num_requests)[:n]
    splits = np.array_split(order, folds)
    for f, test_ids in enumerate(splits):
        library_ids = sorted(np.concatenate([x for g, x in enumerate(splits) if g != f]).tolist())
        assert not set(library_ids) & set(test_ids.tolist())
        library_trace = trace.select(library_ids)
        routing = routing_statistics(library_trace)  # token-level statistics of the library's traces
        yield f, trace.select(sorted(test_ids.tolist())), routing, TraceLibrary.from_trace(library_trace)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacities", default="0.125,0.25,0.5")
    ap.add_argument("--policies", default="lru,lfu,trace,oracle")
    ap.add_argument("--requests", type=int, default=None, help="use only this many requests (quick runs)")
    ap.add_argument("--time-models", default="pcie,ssd")
    ap.add_argument("--out", default=None, help="write all per-fold results as JSON")
    args = ap.parse_args()

    trace = read_trace(args.trace)
    capacities = [float(c) for c in args.capacities.split(",")]
    policies = args.policies.split(",")
    models = args.time_models.split(",")
    rows = []
    for f, test, routing, library in fold_splits(trace, args.folds, args.seed, args.requests):
        layer_calls = int((test.experts >= 0).any(axis=2).sum())
        for capacity in capacities:
            for name in policies:
                first = None
                for model in models:
                    compute, transfer = TIME_MODELS[model]
                    if first is not None and first.prefetches_issued == 0:
                        # Residency does not depend on timing, and without prefetches each layer call
                        # waits for its own misses then computes: the time follows without a rerun.
                        result = dataclasses.replace(
                            first,
                            time_ms=first.demand_misses * transfer + layer_calls * compute,
                            compute_ms_per_layer=compute,
                            transfer_ms_per_expert=transfer,
                        )
                    else:
                        options = {}
                        if name == "trace":
                            options["library"] = copy.deepcopy(library)
                            options["routing"] = routing
                        policy = make_sim_policy(name, test, **options)
                        result = simulate(
                            test,
                            policy,
                            capacity=capacity,
                            compute_ms_per_layer=compute,
                            transfer_ms_per_expert=transfer,
                        )
                        first = first or result
                    r = result.to_dict()
                    r.update(fold=f, time_model=model)
                    rows.append(r)
                    print(
                        f"fold {f} cap {capacity:5.3f} {name:6s} {model:4s} fetches/tok "
                        f"{r['fetches_per_token']:6.2f} ms/tok {r['time_ms_per_token']:7.1f} "
                        f"({r['tokens_per_s']:.0f} tok/s)",
                        flush=True,
                    )
    if args.out:
        with open(args.out, "w") as fh:
            meta = {"trace": args.trace, "folds": args.folds, "seed": args.seed}
            json.dump({**meta, "rows": rows}, fh, indent=1)
    print(summarise(rows, trace.num_layers, capacities, policies, models))


def summarise(rows, num_layers, capacities, policies, models) -> str:
    """Markdown tables: totals over folds, ratio to the oracle, per-fold spread, time vs bound."""

    def pick(**kw):
        return [r for r in rows if all(r[k] == v for k, v in kw.items())]

    lines = ["| capacity | policy | fetches/token | x oracle (all folds) | x oracle per fold (min-max) "
             "| demand misses/token | bypasses/token | wasted prefetches/token | sim tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    first = models[0]
    for cap in capacities:
        oracle = pick(policy="oracle", capacity=cap, time_model=first)
        o_tokens = sum(r["tokens"] for r in oracle)
        o_fetch = sum(r["fetches"] for r in oracle) / o_tokens
        o_fold = {r["fold"]: r["fetches_per_token"] for r in oracle}
        for name in policies:
            rs = pick(policy=name, capacity=cap, time_model=first)
            tokens = sum(r["tokens"] for r in rs)
            fetch = sum(r["fetches"] for r in rs) / tokens
            per_fold = [r["fetches_per_token"] / o_fold[r["fold"]] for r in rs]
            speed = tokens / sum(r["cpu_s"] for r in rs)
            misses, bypasses, wasted = (
                sum(r[k] for r in rs) / tokens for k in ("demand_misses", "bypasses", "prefetches_wasted")
            )
            lines.append(
                f"| {cap:.1%} | {name} | {fetch:.2f} | {fetch / o_fetch:.2f} | "
                f"{min(per_fold):.2f}-{max(per_fold):.2f} | {misses:.2f} | {bypasses:.2f} | {wasted:.2f} | "
                f"{speed:.0f} |"
            )
    lines += ["", "| capacity | policy | " + " | ".join(
        f"{m} ms/token | {m} bound | {m} x bound" for m in models) + " |",
        "|---|---|" + "---|---|---|" * len(models)]  # fmt: skip
    for cap in capacities:
        for name in policies:
            cells = []
            for m in models:
                compute, transfer = TIME_MODELS[m]
                rs = pick(policy=name, capacity=cap, time_model=m)
                oracle = pick(policy="oracle", capacity=cap, time_model=m)
                tokens = sum(r["tokens"] for r in rs)
                t = sum(r["time_ms"] for r in rs) / tokens
                bound = max(num_layers * compute, sum(r["fetches"] for r in oracle) / tokens * transfer)
                cells.append(f"{t:.1f} | {bound:.1f} | {t / bound:.2f}")
            lines.append(f"| {cap:.1%} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(wall {time.time() - t0:.0f} s)")
