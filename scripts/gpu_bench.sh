#!/usr/bin/env bash
# Issue 9's GPU table in one run on a lent GPU machine: a synthetic model shaped like the shared trace
# (24 layers x 32 experts, top-4, hidden 768, expert hidden 1152, 4.1 GB of bf16 experts), its trace
# library seeded from the trace's requests 3-525, then `moeinf bench` at a 25% GPU budget with routing
# replayed from the trace, cold. Writes bench-gpu.json (and the log) to $OUT (or ./gpu-out).
# The trace must travel with the working tree: copy it into an ignored folder and carry it, e.g.
#   mkdir -p gpu-carry && cp ../shared/traces/gpt-oss-20b.decode.dev.npz gpu-carry/ &&
#   echo /gpu-carry/ >> .git/info/exclude      # then run with carry: ["gpu-carry"]
# Usage: bash scripts/gpu_bench.sh [TRACE.npz]   (~5-8 minutes on an H100 machine)
set -euo pipefail
cd "$(dirname "$0")/.."
TRACE="${1:-gpu-carry/gpt-oss-20b.decode.dev.npz}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1 MOEINF_HOME="${MOEINF_HOME:-$(mktemp -d)}"
moeinf() { $PY -m moeinf.cli.main "$@"; }
$PY -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0), torch.__version__)"
time moeinf create s1 --shape 24x32x4 --dim 768 --expert-dim 1152 2>&1 | tail -2
moeinf trace import s1 "$TRACE" --requests 3:
time moeinf bench s1 --device cuda --gpu-mem 25% --policies all-resident,naive,lru,lfu,trace \
  --routing-trace "$TRACE" --cold --repeat 1 --max-tokens 64 --json > "$OUT/bench-gpu.json" 2> "$OUT/bench-gpu.log"
$PY - "$OUT/bench-gpu.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("read bandwidth", round(d["read_bandwidth"]["bytes_per_s"] / 1e9, 2), "GB/s; limit", d["limit"])
for name, p in d["policies"].items():
    print(f"{name:13s} {p['decode_tps']:7.2f} tok/s  hit {p['hit_rate']:.3f}  fetches/token {p['fetches_per_token']:.1f}"
          f"  stall {p['stall_share']:.2f}  x limit {p['of_limit']:.2f}  peak GPU {p.get('peak_gpu_bytes')}")
PY
