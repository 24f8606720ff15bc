#!/bin/bash
# TP2EP on the multi-GPU kinds (issue 13): one torchrun job per GPU count, results in $OUT.
#   run(kind=nvidia-h200-x2, command="bash scripts/gpu/tp2ep.sh")            # n = 2
#   run(kind=nvidia-h200-x4, command="bash scripts/gpu/tp2ep.sh")            # n = 4, then n = 2
#   TP_SIZES="4" bash scripts/gpu/tp2ep.sh                                   # one count only
# Writes $OUT/tp2ep_<n>gpu.json (per_gpu_throughput_fwd / _fwdbwd per T and per ep_chunks,
# decode eager and CUDA-graph ratios, sync-debug results, profile with the NCCL/compute
# overlap), $OUT/tp2ep_<n>gpu.log, and $OUT/trace_<n>gpu.json (chrome trace, rank 0,
# prefill forward), $OUT/symm_probe_2gpu.json (NVSHMEM all_to_all_vdev probe, capped at 60 s;
# PROBE=0 skips it). Each job is capped at 170 s; about 4 to 7 minutes per machine in all.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/pydeps .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/pydeps:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import spmd_types, beartype" 2>/dev/null || echo "WARNING: spmd_types/beartype missing: carry .whl (see scripts/gpu_session.sh)"
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi topo -m 2>&1 | head -8
SIZES=${TP_SIZES:-"$NG $( [ "$NG" -gt 2 ] && echo 2 )"}
for ng in $SIZES; do
  [ "$ng" -ge 2 ] && [ "$NG" -ge "$ng" ] || continue
  t0=$(date +%s)
  # Fewer prefill sizes on the second job of a machine: the figures that matter first.
  # (and the chrome trace only from the first job: $OUT returns at most 8 files).
  extra="--trace $OUT/trace_${ng}gpu.json"; [ "$ng" != "$NG" ] && extra="--prefill 16384 --chunks 1 4"
  timeout 170 torchrun --nproc-per-node "$ng" -m spmd_moe.apps.bench.tp2ep \
      --out "$OUT/tp2ep_${ng}gpu.json" $extra \
      > /dev/null 2> "$OUT/tp2ep_${ng}gpu.log"
  rc=$?
  echo "== n=$ng rc=$rc took $(( $(date +%s) - t0 )) s"
  grep -E "^\[tp2ep" "$OUT/tp2ep_${ng}gpu.log" | grep -vE "chunks=[0-9]+: " | cut -c1-400
  [ $rc -ne 0 ] && tail -30 "$OUT/tp2ep_${ng}gpu.log" | cut -c1-300
done
# Probe (60 s cap): torch's NVSHMEM all-to-all-v with device-side splits, multicast off
# (the transport a prefill all-to-all without a host read would need). Reported, never fatal.
if [ "${PROBE:-1}" = 1 ]; then
  timeout 60 torchrun --nproc-per-node 2 -m spmd_moe.apps.bench.symm_probe --out "$OUT/symm_probe_2gpu.json" \
      > /dev/null 2> "$OUT/symm_probe.log"
  echo "== symm probe rc=$?"; python3 -c "
import json,sys
try:
    r=json.load(open('$OUT/symm_probe_2gpu.json'))
    for s in r['steps']: print(s['step'], s['ok'], s.get('value', s.get('error','')))
except Exception as e: print('no probe result:', e)" 2>&1 | cut -c1-300
fi
ls -la "$OUT"
