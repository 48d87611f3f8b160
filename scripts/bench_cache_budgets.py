"""Issue 5 section 7: the expert cache at budgets 12.5/25/50/100% on one model, and the store's read
bandwidth against dd's direct-I/O figure on the same disk.

Each budget is one `moeinf bench` measurement (policy lru, fresh worker process, page cache dropped
when root), routing replayed from a trace when given. dd reads a scratch file written next to the
store (deleted afterwards) with iflag=direct, bs=4M, after dropping the page cache.

    nice -n 10 .venv/bin/python scripts/bench_cache_budgets.py s1 \
        --routing-trace /work/shared/traces/gpt-oss-20b.decode.dev.npz --out /tmp/budgets.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

from moeinf.bench.runner import BenchConfig, drop_page_cache, measure_read_bandwidth, run_bench
from moeinf.bench.workload import BUILTIN_PROMPTS
from moeinf.store import Store


def dd_direct(store: Store, size_mb: int = 1024) -> dict:
    """GB/s of `dd iflag=direct bs=4M` over a scratch file of `size_mb` on the store's disk."""
    path = store.home / ".dd-bench.tmp"
    try:
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={path}", "bs=4M", f"count={size_mb // 4}", "conv=fsync"],
            check=True,
            capture_output=True,
        )
        dropped = drop_page_cache()
        proc = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        path.unlink(missing_ok=True)
    line = proc.stderr.strip().splitlines()[-1]
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", line)
    assert match, line
    nbytes, seconds = int(match.group(1)), float(match.group(2))
    return {
        "bytes_per_s": nbytes / seconds,
        "bytes": nbytes,
        "seconds": seconds,
        "dd": line,
        "dropped": dropped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--budgets", default="12.5%,25%,50%,100%")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--routing-trace")
    parser.add_argument("--dtype")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    store = Store()
    stored = store.open(args.model)
    out: dict = {"model": args.model, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out["dd_direct"] = dd_direct(store)
    drop_page_cache()
    out["reader_1_thread"] = measure_read_bandwidth(stored, threads=1, seed=1)
    out["reader_4_threads"] = measure_read_bandwidth(stored, threads=4, seed=2)
    rows = []
    for budget in args.budgets.split(","):
        config = BenchConfig(
            model=args.model,
            policies=[args.policy],
            prompts=list(BUILTIN_PROMPTS),
            ram_mem=budget,
            max_tokens=args.max_tokens,
            repeat=args.repeat,
            routing_trace=args.routing_trace,
            cold=True,
            dtype=args.dtype,
        )
        result = run_bench(config, progress=lambda m: print(m, file=sys.stderr))
        s = result["policies"][args.policy]
        rows.append(
            {"budget": budget, **s, "limit": result["limit"], "read_bandwidth": result["read_bandwidth"]}
        )
        print(
            f"{budget:>6}: {s['decode_tps']:.2f} tok/s, {s['fetches_per_token']:.1f} fetches/tok, "
            f"{s['bytes_read_per_token'] / 1e6:.0f} MB/tok, stall {s['stall_share']:.0%}, "
            f"hit {s['hit_rate']:.1%}",
            file=sys.stderr,
        )
        out["machine"] = result["machine"]
    out["rows"] = rows
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
