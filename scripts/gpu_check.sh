#!/usr/bin/env bash
# The GPU checks, in one short run on a machine with CUDA (a lent GPU machine): the CUDA-marked tests
# (expert cache GPU tier over pinned RAM, engine and run on CUDA, serve on CUDA), the decoder's
# fp32 comparison on the GPU, then a short end-to-end `moeinf run` with a 25% GPU budget.
# Usage: bash scripts/gpu_check.sh   (uses .venv if present, else the system python3 with PYTHONPATH=src)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
echo "== CUDA tests"
# (the serve CUDA test needs fastapi/uvicorn/openai, which GPU images may lack: run it separately)
$PY -m pytest -q -p no:cacheprovider -m cuda tests/test_expert_cache_cuda.py tests/test_run_cuda.py tests/test_engine.py
echo "== end to end: moeinf run on CUDA, 25% GPU budget"
export MOEINF_HOME="$(mktemp -d)"
CKPT="$(mktemp -d)/mixtral"
$PY -c "from pathlib import Path; from tests.fixtures.checkpoints import build_checkpoint; build_checkpoint('mixtral', Path('$CKPT'))"
$PY -m moeinf.cli.main pull "$CKPT" --name gpucheck
for budget in 25% 100%; do
  $PY -m moeinf.cli.main run gpucheck "hello world" --raw --device cuda --gpu-mem "$budget" --ram-mem 50% \
    --max-tokens 16 --ignore-eos --format json --verbose > "$MOEINF_HOME/out-$budget.json"
done
$PY - "$MOEINF_HOME" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/out-{x}.json")) for x in ("25%", "100%"))
assert a["token_ids"] == b["token_ids"], "GPU budget changed the output"
print("same tokens at 25% and 100% GPU budgets; cache at 25%:", {k: a["stats"]["cache"][k] for k in ("requests", "hits", "misses", "bytes_h2d")})
PY
echo "gpu_check: all passed"
