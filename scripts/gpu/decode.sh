#!/bin/bash
# Issue 12 decode kernels on one GPU: CUDA parity tests, then the decode bench (+ tile sweep).
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/decode.sh")
set -u
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_decode_kernels.py tests/test_fused_combine.py \
  tests/test_torchtitan_moe.py 2>&1 | tail -6
timeout 300 python3 -m spmd_moe.apps.bench.decode --out "$OUT/decode_gpu.json" ${SWEEP:+--sweep} 2> "$OUT/decode.log" >/dev/null
tail -40 "$OUT/decode.log" | cut -c1-400
