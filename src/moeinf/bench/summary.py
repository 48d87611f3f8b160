"""Turning worker runs into the bench's figures: per-policy medians over repeats and the physical limit.

Pure functions over the JSON the worker prints (numpy only). Per run: TTFT (median over prompts),
decode tokens/s (all decode tokens / all decode time), per-token latency p10/p50/p90 (all decode
steps), and per decode token the cache's requests, hits, fetches (demand misses + prefetches) and
bytes read; stall share = time waiting for experts / decode time. Per policy: the median of each
figure over the repeats. The physical limit per token is max(all-resident time per token, oracle
fetches per token x bytes per expert / store read bandwidth); without an all-resident run there is
none (only the transfer part is reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one worker run."""
    prompts = run["prompts"]
    tokens = sum(p["decode_tokens"] for p in prompts)
    decode_s = sum(p["decode_s"] for p in prompts)
    steps = [ms for p in prompts for ms in p["step_ms"]]
    d = run["decode"]
    fetches = d["misses"] + d["prefetch_issued"]
    per = (lambda x: x / tokens) if tokens else (lambda x: 0.0)
    lat = np.percentile(steps, [10, 50, 90]).tolist() if steps else [0.0, 0.0, 0.0]
    return {
        "ttft_s": float(np.median([p["ttft_s"] for p in prompts])),
        "decode_tokens": tokens,
        "decode_s": decode_s,
        "decode_tps": tokens / decode_s if decode_s > 0 else 0.0,
        "ms_per_token": 1000 * decode_s / tokens if tokens else 0.0,
        "latency_ms_p10": lat[0],
        "latency_ms_p50": lat[1],
        "latency_ms_p90": lat[2],
        "hit_rate": d["hits"] / d["requests"] if d["requests"] else 0.0,
        "requests_per_token": per(d["requests"]),
        "fetches_per_token": per(fetches),
        "prefetches_per_token": per(d["prefetch_issued"]),
        "bytes_read_per_token": per(d["bytes_read"]),
        "stall_share": d["stall_s"] / decode_s if decode_s > 0 else 0.0,
        "oracle_fetches_per_token": (
            run["oracle"]["fetches"] / run["oracle"]["tokens"] if run["oracle"]["tokens"] else 0.0
        ),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "peak_gpu_bytes": run.get("peak_gpu_bytes"),
        "load_s": run["load_s"],
    }


def policy_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every figure over the repeats of one policy, plus what does not vary."""
    figures = [run_figures(r) for r in runs]
    out: dict[str, Any] = {"repeats": len(runs)}
    for key in figures[0]:
        values = [f[key] for f in figures if f[key] is not None]
        out[key] = float(np.median(values)) if values else None
    first = runs[0]
    out.update(slots=first["slots"], read_mode=first["read_mode"], expert_bytes=first["expert_bytes"])
    return out


def physical_limit(
    summaries: dict[str, dict[str, Any]], *, bandwidth_bytes_s: float | None, expert_bytes: int
) -> dict[str, Any]:
    """The lower bound on time per decode token (see the module docstring); parts missing are None."""
    compute_ms = summaries["all-resident"]["ms_per_token"] if "all-resident" in summaries else None
    oracle = [s["oracle_fetches_per_token"] for s in summaries.values()]
    oracle_fpt = float(np.median(oracle)) if oracle else None
    transfer_ms = (
        1000 * oracle_fpt * expert_bytes / bandwidth_bytes_s
        if oracle_fpt is not None and bandwidth_bytes_s
        else None
    )
    # Without the all-resident run the compute part is unknown, and the transfer part alone (often a
    # fraction of a millisecond) is no limit worth comparing with: none then.
    limit_ms = max(compute_ms, transfer_ms or 0.0) if compute_ms is not None else None
    return {
        "compute_ms_per_token": compute_ms,
        "oracle_fetches_per_token": oracle_fpt,
        "transfer_ms_per_token": transfer_ms,
        "ms_per_token": limit_ms,
        "tokens_per_s": 1000 / limit_ms if limit_ms else None,
    }


def latency_curves(runs: Sequence[dict[str, Any]]) -> list[float]:
    """Per decode step index: the median latency (ms) over prompts and repeats (for the plot)."""
    series = [p["step_ms"] for r in runs for p in r["prompts"]]
    n = max((len(s) for s in series), default=0)
    return [float(np.median([s[i] for s in series if i < len(s)])) for i in range(n)]
