#!/bin/bash
# Issue 12 decode kernels on one GPU, <= 150 s in all (second round, after run3 showed the split
# variants slower than the tiled kernels at T=1):
#  1. CUDA parity (<= 60 s; run4 needed more than 45): the EP-argument, split-variant, PDL and T=1/3 tiled tests of
#     tests/test_decode_kernels.py, natively in bf16; output into $OUT/decode.log.
#  2. python -m spmd_moe.apps.bench.decode (<= 78 s): T = 1, 8, 64 with the tiled kernels with and
#     without programmatic dependent launch (tiled / tiled_pdl; split_fused_pdl at T=1 for reference),
#     graph timings, x HBM floor, per-kernel device times; then a TILES sweep (tiled, PDL) at T=1 and
#     T=8 until 60 s of bench wall time. The torch path is not re-timed (run3: 135.5 / 288.3 / 541.8 us).
# Files: $OUT/decode_gpu.json (rewritten after every measurement), $OUT/decode.log. Summary on stdout.
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/decode.sh")
set -u
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
t0=$SECONDS
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py -rf \
  -k "pdl or split or local or fake or same_experts or default_arg or rn_bf16 or (matches_torch_path and (-1] or -3]))" \
  > "$OUT/decode.log" 2>&1
echo "pytest rc=$? in $((SECONDS - t0)) s:"; grep -E "passed|failed|FAILED|rror" "$OUT/decode.log" | tail -6
timeout 78 python3 -m spmd_moe.apps.bench.decode --out "$OUT/decode_gpu.json" --variants tiled tiled_pdl split_fused_pdl \
  --split-max-t 1 --tiled-sweep --budget-s 60 --no-torch-graph --no-torch-profile 2>> "$OUT/decode.log" >/dev/null
echo "bench rc=$? in $((SECONDS - t0)) s total"
python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-400
