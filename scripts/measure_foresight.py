"""How much foresight of the next token's routing the issue-8 goals need (k-fold, like evaluate_policies).

The `trace` policy ranks residents by the probability p that their layer's next visit uses them. Here
the Python `TracePolicy` is run with p mixed with the truth read from the trace being replayed:
p' = (1 - w) p + w [used at the next visit]. w = 1 is the yardstick the issue names ("a policy told
exactly which experts every layer will use on its next visit, falling back on frequency beyond
that"; the follow check is then off, the truth replaces it); w < 1 is a predictor between today's
and a perfect one. For each w it prints fetches per token as a ratio to Belady's MIN (summed over
folds) and, to put w on a scale, the top-4 precision of the mixed prediction of the next token's
experts at each layer (the cross-token predictor's p, as the policy uses it for passed layers).
Pure Python policy: ~3 minutes per fold and weight on this machine.

    nice -n 10 .venv/bin/python scripts/measure_foresight.py \
        /work/shared/traces/gpt-oss-20b.decode.dev.npz --weights 1,0.25,0.1
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

from moeinf.bench.simulator import make_sim_policy, simulate
from moeinf.runtime.trace import Trace, read_trace
from moeinf.runtime.trace_policy import TracePolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_policies import fold_splits  # noqa: E402


def used_at(trace: Trace) -> np.ndarray:
    """[T + 2, L, E] bool: expert e routed at layer l by token t (two empty tokens past the end)."""
    x = trace.experts
    T, L, K = x.shape
    used = np.zeros((T + 2, L, trace.num_experts), dtype=bool)
    t, layer, _ = np.nonzero(x >= 0)
    used[t, layer, x[x >= 0]] = True
    return used


def told_policy(used: np.ndarray, w: float) -> type[TracePolicy]:
    """TracePolicy whose next-visit probability is mixed with the truth by weight `w`."""

    class Told(TracePolicy):
        def _estimate(self, key):
            tv, p, q = TracePolicy._estimate(self, key)
            # The policy's token counter runs over the replayed trace's tokens in order, as `used`'s rows.
            return tv, (1.0 - w) * p + w * float(used[tv, key[0], key[1]]), q

        if w == 1.0:

            def _et_follow(self, key):
                return None  # told the truth: the same-token guess adds nothing

    return Told


def mixed_precision(
    trace: Trace, cross: list[np.ndarray], weights: list[float]
) -> dict[float, tuple[int, int]]:
    """(hits, guesses) of the top-k of (1 - w) clip(cross prediction) + w truth, per w, over the token
    pairs of `trace`'s requests and all layers."""
    x = trace.experts.astype(np.int64)
    T, L, K = x.shape
    E = trace.num_experts
    X = (cross[0].shape[0] - 1) // E - 1
    offs = trace.seq_offsets
    t = np.concatenate([np.arange(offs[s], offs[s + 1] - 1) for s in range(len(offs) - 1)])
    out = {w: [0, 0] for w in weights}
    for c in range(L):
        table = cross[c]  # [(X + 1) * E + 1, E]
        rows = [k * E + x[t, c - k] for k in range(min(X, c) + 1)]  # each [n, K]
        pred = table[np.concatenate(rows, axis=1)].sum(axis=1) + table[-1]  # [n, E]
        truth = np.zeros((len(t), E), dtype=bool)
        np.put_along_axis(truth, x[t + 1, c], True, axis=1)
        for w in weights:
            mixed = (1 - w) * np.clip(pred, 0.01, 0.99) + w * truth
            top = np.argsort(-mixed, axis=1)[:, :K]
            out[w][0] += int(np.take_along_axis(truth, top, axis=1).sum())
            out[w][1] += top.size
    return {w: (h, n) for w, (h, n) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="1,0.25,0.1")
    ap.add_argument("--capacities", default="0.125,0.25,0.5")
    ap.add_argument("--requests", type=int, default=None, help="use only this many requests (quick runs)")
    args = ap.parse_args()
    trace = read_trace(args.trace)
    weights = [float(w) for w in args.weights.split(",")]
    caps = [float(c) for c in args.capacities.split(",")]
    fetches: dict = {}
    precision = {w: [0, 0] for w in [0.0, *weights]}  # w = 0: today's predictor
    for f, test, routing, library in fold_splits(trace, args.folds, args.seed, args.requests):
        used = used_at(test)
        for w, (h, n) in mixed_precision(test, routing.cross, list(precision)).items():
            precision[w][0] += h
            precision[w][1] += n
        shape = {"num_layers": test.num_layers, "num_experts": test.num_experts, "top_k": test.top_k}
        for cap in caps:
            oracle = simulate(test, make_sim_policy("oracle", test), capacity=cap)
            fetches["oracle", cap] = fetches.get(("oracle", cap), 0) + oracle.fetches
            for w in weights:
                policy = told_policy(used, w)(copy.deepcopy(library), routing=routing, **shape)
                r = simulate(test, policy, capacity=cap, native=False)
                fetches[w, cap] = fetches.get((w, cap), 0) + r.fetches
                print(f"fold {f} cap {cap:.3f} w {w}: {r.fetches / oracle.fetches:.4f} x oracle", flush=True)
    print("\n| w | next-token top-k precision | " + " | ".join(f"x oracle at {c:.1%}" for c in caps) + " |")
    print("|---|---|" + "---|" * len(caps))
    print(
        f"| 0 (today) | {precision[0.0][0] / precision[0.0][1]:.3f} | "
        + " | ".join(["see evaluate_policies"] * len(caps))
        + " |"
    )
    for w in weights:
        ratios = " | ".join(f"{fetches[w, c] / fetches['oracle', c]:.3f}" for c in caps)
        print(f"| {w} | {precision[w][0] / precision[w][1]:.3f} | {ratios} |")


if __name__ == "__main__":
    main()
