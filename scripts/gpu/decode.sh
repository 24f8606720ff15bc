#!/bin/bash
# Issue 12 decode kernels on one GPU, <= 150 s in all:
#  1. CUDA parity: every kernel test of tests/test_decode_kernels.py runs natively on CUDA (bf16),
#     the 'split' / 'split_fused' variants and the EP arguments included (<= 55 s).
#  2. python -m spmd_moe.apps.bench.decode: T = 1, 8, 64; the tiled kernels (session 3) vs the
#     split variants (split, split_fused, split_fused_pdl; T <= 8) vs the torch path, CUDA-graph timings and x HBM floor, per-kernel
#     device times; then a SPLIT_TILES sweep at T=1 until 62 s of bench wall time (<= 80 s).
# Files: $OUT/decode_gpu.json (written after every row, so a cut-short run keeps its rows),
#        $OUT/decode.log (the bench's stderr). Summary on stdout.
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/decode.sh")
set -u
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
t0=$SECONDS
timeout 55 python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py 2>&1 | grep -E "passed|failed|error|FAILED|Error" | tail -8
echo "pytest done in $((SECONDS - t0)) s"
timeout 80 python3 -m spmd_moe.apps.bench.decode --out "$OUT/decode_gpu.json" --split-sweep --budget-s 62 \
  --no-torch-profile 2> "$OUT/decode.log" >/dev/null
echo "bench rc=$? in $((SECONDS - t0)) s total"
python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-400
grep -iE "error|traceback" "$OUT/decode.log" | head -5
