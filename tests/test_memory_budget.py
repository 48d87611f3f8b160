"""Memory is the product: a run at a 25% expert budget keeps its peak RSS within dense weights + the
budget + a stated overhead, on a model whose experts total several hundred MB (issue 5).

Each run is a real `moeinf run` subprocess; its peak RSS (VmHWM) is read from /proc when it ends.
The overhead is the process itself (Python, torch, tokenizer: measured by the `naive` run, which
caches nothing) plus the cache's 2 scratch slots and a small allowance for activations and the KV
cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeinf.bench.synthetic import parse_shape, write_synthetic_checkpoint
from moeinf.demo import checkpoint_dir
from moeinf.pull import pull
from moeinf.runtime.cache_plan import slot_bytes_for, slot_dtype
from moeinf.runtime.expert_store import ExpertLayout

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
MiB = 1 << 20
ALLOWANCE = 48 * MiB  # activations, KV cache, allocator slack beyond what the naive run already has

PEAK_RSS = """
import runpy, sys
sys.argv = ["moeinf", *sys.argv[1:]]
try:
    runpy.run_module("moeinf.cli.main", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_KB", int(line.split()[1]), file=sys.stderr)
sys.exit(code)
"""


def peak_rss(*args: str) -> int:
    env = {**os.environ, "MOEINF_NATIVE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("PEAK_KB"))
    return int(line.split()[1]) * 1024


def test_peak_rss_within_dense_plus_budget_plus_overhead(tmp_path):
    # 4 layers x 32 experts of 3 x 512 x 1024 bf16 (3 MiB each): 384 MiB of experts.
    shape = parse_shape("4x32x2", hidden=512, expert_dim=1024)
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", shape, tokenizer_dir=checkpoint_dir())
    stored = pull(str(ckpt), name="mem")
    expert_bytes = shape.expert_bytes(2)
    assert expert_bytes >= 300 * MiB

    # A prompt of a few dozen tokens: its prefill routes to nearly every expert, so each run fills
    # as many slots as its budget allows.
    prompt = "def main(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n" * 3
    run = ["run", "mem", prompt, "--raw", "--max-tokens", "8", "--ignore-eos", "--device", "cpu"]
    baseline = peak_rss(*run, "--policy", "naive")  # no cache: the process and its dense weights
    quarter = peak_rss(*run, "--ram-mem", "25%", "--policy", "lru")
    everything = peak_rss(*run, "--ram-mem", "100%", "--policy", "lru")

    spec = stored.manifest.spec
    layout = ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype)
    slot = slot_bytes_for(layout, slot_dtype(spec.dtype, torch.device("cpu"), torch.float32))
    budget = (4 * 32 // 4) * slot  # 25% of the 128 experts
    overhead = 2 * slot + ALLOWANCE
    assert quarter - baseline <= budget + overhead, (quarter, baseline, budget)
    # The budget is what bounds it: the 100% run, with the same prompt, holds about four times as much.
    assert everything - baseline >= 3 * (quarter - baseline) - overhead
    dense = stored.dense_path.stat().st_size
    print(
        f"dense {dense / MiB:.0f} MiB, slot {slot / MiB:.2f} MiB, budget {budget / MiB:.0f} MiB, peak RSS: "
        f"naive {baseline / MiB:.0f} MiB, 25% {quarter / MiB:.0f} MiB, 100% {everything / MiB:.0f} MiB"
    )
