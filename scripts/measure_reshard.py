"""Measure `pull`'s peak RAM and peak extra disk on a >= 1 GB checkpoint served by a local hub.

Builds a synthetic Mixtral-architecture checkpoint (one shard per layer, bf16) with
moeinf.bench.synthetic, serves it from an in-process hub server (tests/fixtures/hub_server.py), and
runs `pull` in a child process so its peak RSS is the child's alone. While the child runs, the
partial folder is sampled every 20 ms: "extra disk" is what exists beyond the model's final files
(downloaded shard + reshard work files). Run from the repository root:

    nice -n 19 .venv/bin/python -m scripts.measure_reshard --layers 12 --experts 16 [--dtype fp16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.checkpoints import build_tokenizer
from tests.fixtures.hub_server import HubServer

from moeinf.bench.synthetic import SyntheticShape, write_synthetic_checkpoint


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # deleted while walking
                pass
    return total


def run_measured(command: list[str], env: dict[str, str], sample: Callable[[], None]) -> tuple[int, int]:
    """Run `command`, calling `sample()` every 20 ms; return its exit code and peak RSS in bytes.

    Peak RSS is the child's VmHWM from /proc (reset by exec, so the parent's memory is not counted,
    unlike getrusage(RUSAGE_CHILDREN) after a fork).
    """
    child = subprocess.Popen(command, env=env)
    hwm = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            hwm = max(
                hwm, int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024
            )
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        sample()
        time.sleep(0.02)
    return child.returncode, hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="convert while resharding (bf16/fp16/fp32)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="moeinf-measure-"))
    tokenizer = work / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tokenizer)
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").exists():
        shape = SyntheticShape(layers=args.layers, experts=args.experts, top_k=2)
        write_synthetic_checkpoint(checkpoint, shape, tokenizer_dir=tokenizer)
    shards = sorted(checkpoint.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    print(
        f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards, largest "
        f"{max(p.stat().st_size for p in shards) / 1e6:.0f} MB",
        flush=True,
    )

    home = work / "home"
    with HubServer() as hub:
        hub.add_repo("measure/synthetic", checkpoint)
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "MOEINF_HOME": str(home),
            "HF_HOME": str(work / "hf"),
        }
        extra_args = f", dtype={args.dtype!r}" if args.dtype else ""
        code = f"from moeinf.pull import pull; pull('measure/synthetic', name='synthetic'{extra_args})"
        partial = home / "partial" / "synthetic"

        # the same imports without pulling: the interpreter's own footprint, for comparison
        imports = "import moeinf.pull, moeinf.reshard, moeinf.models.adapters, huggingface_hub, httpx2"
        base_rss = run_measured([sys.executable, "-c", imports], env, lambda: None)[1]
        peak = {"extra": 0}

        def sample() -> None:
            extra = tree_bytes(partial / "download") + tree_bytes(partial / "build" / ".reshard")
            peak["extra"] = max(peak["extra"], extra)

        start = time.perf_counter()
        returncode, rss = run_measured([sys.executable, "-c", code], env, sample)
        elapsed = time.perf_counter() - start
    if returncode:
        sys.exit(returncode)
    stored = tree_bytes(home / "models" / "synthetic")
    print(
        f"pull{' --dtype ' + args.dtype if args.dtype else ''}: {elapsed:.1f} s, "
        f"{total / elapsed / 1e6:.0f} MB/s of checkpoint"
    )
    print(
        f"peak RSS of the pull process: {rss / 1e6:.0f} MB "
        f"(interpreter + imports alone: {base_rss / 1e6:.0f} MB)"
    )
    print(f"peak extra disk (download + reshard work files): {peak['extra'] / 1e6:.0f} MB")
    print(f"store size: {stored / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
