#!/bin/bash
# TP2EP on the multi-GPU kinds (issue 13): one torchrun job per GPU count, results in $OUT.
#   SF=1 bash scripts/gpu/tp2ep.sh   # session 6 (< 200 s on nvidia-h200-x2): ONLY the fixed-size
#       exchange (no host read) against the split-size path, side by side (alternating rounds),
#       T=4096 and 16384 per GPU, fwd and fwd+bwd, against one GPU; sync-debug of both; profiles.
#       Writes $OUT/tp2ep_sf_<n>gpu.json and .log; prints the table last.
#   SMOKE=1 SF=1 bash scripts/gpu/tp2ep.sh   # CPU dry run: gloo, 2 ranks, tiny shapes
# Needs >= 2 GPUs (nvidia-h200-x2 or -x4); on one GPU it says so and exits in seconds.
#   run(kind=nvidia-h200-x2, carry=[".whl"], command="bash scripts/gpu/tp2ep.sh")
#       default (quick, one job capped at 190 s): n = all GPUs, the sync-free prefill section
#       (--sync-free: fixed-size exchange vs split sizes, T=4096 and 16384, fwd and fwd+bwd, two
#       clocks, CUDA graphs, sync-debug, profiles; per_gpu_throughput_fwd / _fwdbwd per T in
#       "prefill") then decode T=8 and 64 (eager + CUDA graphs + sync-debug). No probe.
#   FULL=1 bash scripts/gpu/tp2ep.sh    # T=4096 and 16384, ep_chunks 1 2 4, and on x4 a second
#                                       # job with n=2 (about 4 to 7 minutes), then the probe
#   PROBE=1 adds the NVSHMEM probe (40 s cap); TP_SIZES="2" picks the GPU counts.
# Writes $OUT/tp2ep_<n>gpu.json (per_gpu_throughput_fwd / _fwdbwd per T and per ep_chunks,
# decode eager and CUDA-graph ratios, sync-debug results, profile with the NCCL/compute
# overlap; rewritten after every section) and $OUT/tp2ep_<n>gpu.log (the probe's stderr
# too): 2 files; PROBE=1 adds $OUT/tp2ep_symm_probe.json, TRACE=1 (default with FULL=1)
# $OUT/tp2ep_trace_<n>gpu.json (chrome trace, rank 0, prefill forward, first job only).
set -u
source scripts/gpu/common.sh  # carried wheels, NCCL_NVLS_ENABLE=0 & co, $OUT, PYTHONPATH
export OMP_NUM_THREADS=4
if [ "${SF:-0}" = 1 ]; then
  if [ "${SMOKE:-0}" = 1 ]; then ng=2; extra="--smoke"; SF_ROUNDS=${SF_ROUNDS:-1}; SF_T=${SF_T:-4096}; else
    ng=$(python3 -c "import torch; print(torch.cuda.device_count())"); extra=""
    if [ "$ng" -lt 2 ]; then echo "tp2ep SF: needs >= 2 GPUs, this machine has $ng: nothing run"; exit 0; fi
    ng=2  # EP=2: the issue's goal figures
  fi
  t0=$(date +%s)
  timeout ${SF_CAP:-180} torchrun --nproc-per-node $ng -m spmd_moe.apps.bench.tp2ep --sync-free $extra --decode ${SF_DECODE:-8 64} \
      --prefill ${SF_T:-4096 16384} --rounds ${SF_ROUNDS:-3} --out "$OUT/tp2ep_sf_${ng}gpu.json" \
      > /dev/null 2> "$OUT/tp2ep_sf_${ng}gpu.log"
  rc=$?
  echo "== SF n=$ng rc=$rc took $(( $(date +%s) - t0 )) s"
  grep -E "^\[tp2ep" "$OUT/tp2ep_sf_${ng}gpu.log" | cut -c1-1800
  [ $rc -ne 0 ] && tail -30 "$OUT/tp2ep_sf_${ng}gpu.log" | cut -c1-300
  [ -f "$OUT/tp2ep_sf_${ng}gpu.json" ] && python3 -m spmd_moe.apps.bench.tp2ep --table "$OUT/tp2ep_sf_${ng}gpu.json" 2>&1 | cut -c1-700
  exit $rc
fi
python3 -c "import spmd_types, beartype" 2>/dev/null || echo "WARNING: spmd_types/beartype missing: carry .whl (see scripts/gpu_session.sh)"
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi topo -m 2>&1 | head -8
if [ "$NG" -lt 2 ]; then echo "tp2ep: needs >= 2 GPUs, this machine has $NG: nothing run"; exit 0; fi
if [ "${FULL:-0}" = 1 ]; then
  SIZES=${TP_SIZES:-"$NG $( [ "$NG" -gt 2 ] && echo 2 )"}; CAP=170; FIRST=""; TRACE=${TRACE:-1}; PROBE=${PROBE:-1}
else
  # Session 6: the sync-free prefill section (fixed-size exchange vs split sizes, both clocks, fwd and
  # f+b, graphs, profiles; per_gpu_throughput_fwd / _fwdbwd from it) and the decode section, one job.
  SIZES=${TP_SIZES:-"$NG"}; CAP=190; FIRST="--sync-free --prefill 4096 16384"; TRACE=${TRACE:-0}; PROBE=${PROBE:-0}
fi
for ng in $SIZES; do
  [ "$ng" -ge 2 ] && [ "$NG" -ge "$ng" ] || continue
  t0=$(date +%s)
  # Fewer prefill sizes on the second job of a machine: the figures that matter first.
  # (and the chrome trace only from the first job: $OUT returns at most 8 files).
  extra="$FIRST"; [ "$TRACE" = 1 ] && extra="$extra --trace $OUT/tp2ep_trace_${ng}gpu.json"
  [ "$ng" != "$NG" ] && extra="--prefill 16384 --chunks 1 2"
  timeout $CAP torchrun --nproc-per-node "$ng" -m spmd_moe.apps.bench.tp2ep \
      --out "$OUT/tp2ep_${ng}gpu.json" $extra \
      > /dev/null 2> "$OUT/tp2ep_${ng}gpu.log"
  rc=$?
  echo "== n=$ng rc=$rc took $(( $(date +%s) - t0 )) s"
  grep -E "^\[tp2ep" "$OUT/tp2ep_${ng}gpu.log" | cut -c1-330
  [ $rc -ne 0 ] && tail -30 "$OUT/tp2ep_${ng}gpu.log" | cut -c1-300
  [ -f "$OUT/tp2ep_${ng}gpu.json" ] && python3 -m spmd_moe.apps.bench.tp2ep --table "$OUT/tp2ep_${ng}gpu.json" 2>&1 | cut -c1-400
done
# Probe (40 s cap): torch's NVSHMEM all-to-all-v with device-side splits, multicast off
# (the transport a prefill all-to-all without a host read would need). Reported, never fatal.
if [ "$PROBE" = 1 ]; then
  timeout 40 torchrun --nproc-per-node 2 -m spmd_moe.apps.bench.symm_probe --out "$OUT/tp2ep_symm_probe.json" \
      > /dev/null 2>> "$OUT/tp2ep_${NG}gpu.log"
  echo "== symm probe rc=$?"; python3 -c "
import json,sys
try:
    r=json.load(open('$OUT/tp2ep_symm_probe.json'))
    for s in r['steps']: print(s['step'], s['ok'], s.get('value', s.get('error','')))
except Exception as e: print('no probe result:', e)" 2>&1 | cut -c1-300
fi
ls -la "$OUT"
