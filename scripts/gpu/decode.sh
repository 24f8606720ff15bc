#!/bin/bash
# Issue 12 decode kernels on one GPU, session 6: the slot design (SLOT in spmd_moe/kernels/decode.py:
# the router in one kernel, up per slot with one dependent read, down + combine in one kernel;
# 3 kernels) against the tiled kernels (5 kernels), each with and without PDL. < 150 s in all:
#  1. CUDA run of tests/test_decode_kernels.py (<= 58 s): the slot and fused-router tests first (EP
#     arguments, PDL + CUDA graph included; <= 45 s), then in the time left the other PDL tests and the T=1 tiled parity tests,
#     natively in bf16 -> $OUT/decode.log.
#  2. python -m spmd_moe.apps.bench.decode --alternate (<= 80 s): T = 1, 8, 64 (slot* at T <= 8), every
#     variant's CUDA graph captured once, then timed in turn (tiled, tiled_pdl, tiled_fr_pdl = tiled with the
#     router in one kernel (ROUTER), slot, slot_pdl, slot_dot_pdl, slot_flat_pdl; dot: tl.dot instead of
#     GEMVs, flat: the down loop over all (expert, F step) pipelined),
#     repeated --rounds times (A B C D A B C D ...), median of the rounds' medians, x HBM floor, diffs vs the torch
#     path, per-kernel device times; then a SLOT_TILES sweep at T=1 (each choice alternated with the
#     default tiles) until 62 s of bench wall time.
# Files: $OUT/decode_gpu.json (rewritten after every T), $OUT/decode.log. Summary on stdout (last lines:
# "T=1: best <variant> xN floor").
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/decode.sh")
# CPU dry run (Triton's interpreter, tiny shapes, no pytest): DECODE_SMALL=1 OUT=/tmp/dec bash scripts/gpu/decode.sh
set -u
source scripts/gpu/common.sh
t0=$SECONDS
if [ -n "${DECODE_SMALL:-}" ]; then
  export TRITON_INTERPRET=1 SPMD_MOE_DECODE_INTERPRET=1
  timeout 120 python3 -m spmd_moe.apps.bench.decode --alternate --small --tokens 1 3 --rounds 2 --reps 2 \
    --slot-max-t 3 --alt-variants tiled tiled_fr slot slot_dot_pdl slot_flat --out "$OUT/decode_gpu.json" 2> "$OUT/decode.log" >/dev/null
  echo "dry-run bench rc=$? in $((SECONDS - t0)) s"
  python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-400
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py -rf -k "slot or router" > "$OUT/decode.log" 2>&1
echo "pytest (slot, router) rc=$? in $((SECONDS - t0)) s:"; grep -E "passed|failed|FAILED|rror" "$OUT/decode.log" | tail -6 | cut -c1-300
left=$((58 - (SECONDS - t0)))
if [ $left -ge 5 ]; then
  timeout $left python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py -rf \
    -k "(pdl and not slot and not tiled_fr) or default_arg or rn_bf16 or (fast_decode_matches_torch_path and -1])" >> "$OUT/decode.log" 2>&1
  echo "pytest (others, cap $left s) rc=$? at $((SECONDS - t0)) s:"; grep -E "passed|failed|FAILED|rror" "$OUT/decode.log" | tail -3 | cut -c1-300
fi
timeout 80 python3 -m spmd_moe.apps.bench.decode --alternate --out "$OUT/decode_gpu.json" --tokens 1 8 64 \
  --alt-variants tiled tiled_pdl tiled_fr_pdl slot slot_pdl slot_dot_pdl slot_flat_pdl --rounds 9 --reps 200 --slot-max-t 8 --slot-sweep --budget-s 62 \
  2>> "$OUT/decode.log" >/dev/null
echo "bench rc=$? in $((SECONDS - t0)) s total"
python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-600
