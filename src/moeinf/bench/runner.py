"""`moeinf bench`'s driver: runs each (policy, repeat) in a fresh worker process, interleaved, and
assembles the result object (machine, configuration, store read bandwidth, per-policy medians,
physical limit, raw runs).

Cold runs drop the page cache before each measured run when the process may (root), else rely on
the expert cache's direct I/O; the store's read bandwidth is measured before every run by reading a
sample of expert files with direct I/O on as many threads as the cache's readers (the limit uses the
median of these probes).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeinf.bench.summary import latency_curves, physical_limit, policy_summary
from moeinf.bench.worker import ALL_RESIDENT, ORACLES
from moeinf.errors import BadOption, BenchRunFailed

DEFAULT_POLICIES = ("all-resident", "naive", "lru", "lfu", "trace")
READ_THREADS = 4  # the expert cache's reader threads (ExpertCache workers)


@dataclass
class BenchConfig:
    model: str
    policies: list[str]
    prompts: list[tuple[str, str]]
    ram_mem: str | None = "25%"
    gpu_mem: str | None = None
    max_tokens: int = 64
    repeat: int = 1
    routing_trace: str | None = None
    cold: bool = False
    device: str = "auto"
    dtype: str | None = None
    threads: int | None = None
    notes: list[str] = field(default_factory=list)


def resolve_policies(names: Sequence[str], *, replay: bool = False) -> tuple[list[str], list[str]]:
    """Known, de-duplicated policy names in order, and notes on those skipped. `oracle` (Belady's MIN)
    and `oracle-prefetch` (MIN with perfect foresight two layer steps ahead) run only under routing
    replay (`replay`), where the trace tells them the future."""
    from moeinf.runtime.policy import POLICIES

    runnable = {ALL_RESIDENT, *POLICIES, *ORACLES}
    chosen, notes = [], []
    for raw in names:
        name = raw.strip()
        if not name or name in chosen:
            continue
        if name in ORACLES and not replay:
            notes.append(
                f"{name}: runs only with --routing-trace (the replayed trace is its future); without, "
                "Belady's fetches are still the physical limit's yardstick"
            )
        elif name not in runnable:
            raise BadOption(f"unknown policy {name!r}; choose from: {', '.join(sorted(runnable))}")
        else:
            chosen.append(name)
    if not chosen:
        raise BadOption("no policy to run")
    return chosen, notes


def drop_page_cache() -> bool:
    """sync + drop the page cache (root only); False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure_read_bandwidth(stored, *, files: int = 48, threads: int = READ_THREADS, seed: int = 0) -> dict:
    """Read `files` random expert files with direct I/O on `threads` threads -> bytes/s and mode."""
    import mmap

    from moeinf.runtime.expert_store import ExpertLayout, ExpertReader

    spec = stored.manifest.spec
    layout = ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype)
    keys = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]
    sample = random.Random(seed).sample(keys, min(files, len(keys)))
    reader = ExpertReader(layout, direct=True)
    work = list(sample)
    lock = threading.Lock()

    def worker() -> None:
        buf = mmap.mmap(-1, layout.read_bytes)  # page aligned, as O_DIRECT needs
        view = memoryview(buf)
        while True:
            with lock:
                if not work:
                    break
                layer, expert = work.pop()
            reader.read_into(stored.expert_path(layer, expert), view)
        view.release()
        buf.close()

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    nbytes = len(sample) * layout.data_bytes
    return {
        "bytes_per_s": nbytes / seconds if seconds > 0 else 0.0,
        "files": len(sample),
        "bytes": nbytes,
        "seconds": seconds,
        "threads": threads,
        "mode": reader.mode,
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": _meminfo("MemTotal"),
        "ram_available_bytes": _meminfo("MemAvailable"),
        "root": hasattr(os, "geteuid") and os.geteuid() == 0,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meminfo(field_name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_worker(config: BenchConfig, policy: str) -> dict[str, Any]:
    """One measured run in a fresh `python -m moeinf.bench.worker` process."""
    payload = {**asdict(config), "policy": policy}
    proc = subprocess.run(
        [sys.executable, "-m", "moeinf.bench.worker"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchRunFailed(f"bench run of {policy} failed (exit {proc.returncode}): {tail}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise BenchRunFailed(f"bench run of {policy}: {result['error']}", kind=result.get("kind"))
    return result


def run_bench(
    config: BenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
    worker: Callable[[BenchConfig, str], dict[str, Any]] = run_worker,
    pull_progress: Callable | None = None,
) -> dict[str, Any]:
    """Measure every policy `repeat` times, interleaved; returns the bench's result object."""
    from moeinf.store import Store

    say = progress or (lambda message: None)
    if config.repeat < 1:
        raise BadOption(f"--repeat must be >= 1, got {config.repeat}")
    if config.max_tokens < 2:
        raise BadOption(
            f"--max-tokens must be >= 2 (decode needs a token after the first), got {config.max_tokens}"
        )
    from moeinf.runtime.budget import parse_size

    for budget in (config.ram_mem, config.gpu_mem):
        if budget is not None:
            parse_size(budget)  # a bad size fails here, not in every worker after the probes
    if config.routing_trace:
        from moeinf.runtime.trace import read_trace

        read_trace(config.routing_trace)  # a bad file fails here, before any run
    stored = _open_or_pull(Store(), config.model, pull_progress)
    config.model = stored.name  # workers open it by its store name

    cold = {"requested": config.cold, "page_cache_dropped": False}
    if config.cold:
        cold["page_cache_dropped"] = drop_page_cache()
        if not cold["page_cache_dropped"]:
            config.notes.append("--cold: cannot drop the page cache (not root); relying on direct I/O")
    say("measuring the store's read bandwidth")
    # Probed again before every run: a disk's speed drifts within minutes (1.0 to 1.6 GB/s on the
    # build machine's virtio disk), and the limit should not hang on one sample taken at the start.
    probes = [measure_read_bandwidth(stored)]

    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in config.policies}
    library = LibrarySnapshot(stored)
    no_room = False  # all-resident was asked for but the experts do not fit in memory
    try:
        for r in range(config.repeat):
            for policy in list(config.policies):
                if config.cold:
                    drop_page_cache()
                library.restore()  # every run of `trace` starts from the library as it was
                if r or policy != config.policies[0]:
                    probes.append(measure_read_bandwidth(stored, seed=len(probes)))
                say(f"run {r + 1}/{config.repeat}: {policy}")
                try:
                    runs[policy].append(worker(config, policy))
                except BenchRunFailed as exc:
                    if policy != ALL_RESIDENT or exc.kind != "BudgetTooLarge":
                        raise
                    # A model larger than memory, the case moeinf is for: no all-resident yardstick.
                    no_room = True
                    config.policies.remove(policy)
                    del runs[policy]
                    config.notes.append(f"skipped: {exc}")
    finally:
        library.restore()  # the bench leaves the model's trace library as it found it

    rates = [p["bytes_per_s"] for p in probes]
    bandwidth = {
        **probes[0],
        "bytes_per_s": statistics.median(rates),  # what the limit uses
        "probes": len(rates),
        "probes_bytes_per_s": rates,  # one before each run
    }
    summaries = {p: policy_summary(rs) for p, rs in runs.items()}
    expert_bytes = next(iter(runs.values()))[0]["expert_bytes"] or _expert_bytes(stored)
    limit = physical_limit(summaries, bandwidth_bytes_s=bandwidth["bytes_per_s"], expert_bytes=expert_bytes)
    if limit["ms_per_token"] is None and not no_room:
        config.notes.append(
            "no physical limit: it needs all-resident in --policies (its compute time per token)"
        )
    for summary in summaries.values():
        tps = summary["decode_tps"]
        summary["of_limit"] = tps / limit["tokens_per_s"] if limit["tokens_per_s"] and tps else None
    spec = stored.manifest.spec
    return {
        "model": stored.name,
        "shape": {
            "moe_layers": len(spec.moe_layers),
            "experts": spec.num_experts,
            "top_k": spec.top_k,
            "hidden": spec.hidden_size,
            "expert_dim": spec.expert_dim,
            "dtype": spec.dtype,
            "expert_bytes": expert_bytes,
        },
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: v for k, v in asdict(config).items() if k not in ("model", "notes")},
        "cold": cold,
        "read_bandwidth": bandwidth,
        "policies": summaries,
        "limit": limit,
        "latency_curves": {p: latency_curves(rs) for p, rs in runs.items()},
        "notes": config.notes,
        "trace_library_entries": library.entries,  # at the start of every `trace` run
        "runs": runs,
    }


class LibrarySnapshot:
    """The model's trace library file as it was when the bench started (the `trace` policy learns
    into it): restoring it keeps repeats independent and the user's library untouched."""

    def __init__(self, stored) -> None:
        from moeinf.runtime.trace_library import FILE_NAME, library_dir, open_model_library

        self.path = Path(library_dir(stored.path)) / FILE_NAME
        self.data = self.path.read_bytes() if self.path.is_file() else None
        self.size = len(self.data) if self.data is not None else 0
        self.entries = len(open_model_library(stored)) if self.data is not None else 0

    def restore(self) -> None:
        if self.data is None:
            self.path.unlink(missing_ok=True)
        elif not self.path.is_file() or self.path.read_bytes() != self.data:
            tmp = self.path.with_name(self.path.name + ".bench-tmp")
            tmp.write_bytes(self.data)
            tmp.replace(self.path)


def _open_or_pull(store, model: str, progress: Callable | None):
    """The stored model; one that is missing is pulled first (`moeinf bench demo` works at once)."""
    from moeinf.errors import ModelNotFound, UnknownAlias
    from moeinf.names import resolve_name
    from moeinf.pull import pull

    try:
        return store.open(resolve_name(model))
    except ModelNotFound as missing:
        try:
            return pull(model, store=store, progress=progress)
        except UnknownAlias:
            raise missing from None


def _expert_bytes(stored) -> int:
    spec = stored.manifest.spec
    from moeinf.runtime.expert_store import ExpertLayout

    return ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype).data_bytes
