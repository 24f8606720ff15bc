#!/bin/bash
# Issue 12's acceptance run on one GPU: `spmd-moe bench --json --full` (spmd_moe against
# torchtitan 0.3.0, the raw grouped GEMMs and the HBM floor in the same process, decode in CUDA
# graphs, forward+backward) with its plot, then the kernel profile (spmd_moe and torchtitan,
# kernels and device time per forward / forward+backward).
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/bench_full.sh")   (< 240 s)
# Writes $OUT/moe_h200.json, $OUT/moe_h200.png, $OUT/profile_h200.json, $OUT/bench_full.log.
# Last lines: the table and the goal column (targets, each with met true/false).
set -u
t0=$SECONDS
source scripts/gpu/common.sh
with_torchtitan
LOG="$OUT/bench_full.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$LOG" 2>&1
timeout ${BENCH_CAP:-170} python3 -m spmd_moe.apps.cli bench --json --full --plot "$OUT/moe_h200.png" \
  --out "$OUT/moe_h200.json" > /dev/null 2>> "$LOG"
echo "bench rc=$? at $((SECONDS - t0)) s"
left=$((230 - (SECONDS - t0)))
if [ "${PROFILE:-1}" = 1 ] && [ $left -gt 20 ]; then
  timeout $left python3 -m spmd_moe.apps.bench.gpu_profile --out "$OUT/profile_h200.json" >> "$LOG" 2>&1
  echo "profile rc=$? at $((SECONDS - t0)) s"
fi
python3 - "$OUT" <<'PY' || tail -20 "$LOG"
import json, sys
from spmd_moe.apps.bench.moe_bench import table
out = sys.argv[1]
r = json.load(open(f"{out}/moe_h200.json"))
print(table(r))
print("plot:", r.get("plot"))
for k, v in r["targets"].items():
    print(k, json.dumps(v))
try:
    p = json.load(open(f"{out}/profile_h200.json"))
    for row in p["rows"]:
        for key in ("spmd_fwd", "titan_fwd", "spmd_fwdbwd", "titan_fwdbwd"):
            if key in row:
                print(f"T={row['T']} {key}: {row[key]['device_ms_per_call']} ms, {row[key]['kernels_per_call']:.0f} kernels")
except FileNotFoundError:
    print("no profile")
PY
echo "total $((SECONDS - t0)) s"
