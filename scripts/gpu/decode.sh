#!/bin/bash
# Issue 12 decode kernels on one GPU, session 6 (final defaults: the slot design at T=1, PDL on), < 150 s:
#  1. python -m spmd_moe.apps.bench.decode --alternate (<= 95 s): T = 1, 8, 64; every variant's CUDA graph
#     captured once, then timed in turn, 9 rounds (A B C A B C ...), median of the rounds' medians, x HBM floor,
#     diffs vs the torch path and vs tiled, per-kernel device times (T=1). Two timings each: one layer a graph
#     replay (as in sessions 3-5: includes the input copy kernel and the graph launch, so host-sensitive at
#     T=1) and "per layer of 8 in one graph": 8 layers (weight copies at other addresses) on 8 inputs captured
#     in ONE graph, replay / 8 (a model's decode step; no copy, one launch). Variants:
#       tiled      the 5 kernels of session 3 (gate, route, up, down, combine), no PDL: the old default
#       tiled_pdl  the same with programmatic dependent launch: the default for 1 < T <= 64
#       slot_pdl   SLOT (T=1 only): router_kernel (gate + route in one kernel), up and down per slot (one
#                  dependent read each instead of the plan's chain), combine, with PDL: the default at T=1
#  2. the CUDA run of 10 chosen tests of tests/test_decode_kernels.py in the time left (<= 45 s).
# Files: $OUT/decode_gpu.json (rewritten after every variant and round), $OUT/decode.log. Summary (last lines:
# "T=1: best <variant> xN floor").
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/decode.sh")
# CPU dry run (Triton's interpreter, tiny shapes, no pytest): DECODE_SMALL=1 OUT=/tmp/dec bash scripts/gpu/decode.sh
set -u
source scripts/gpu/common.sh
t0=$SECONDS
if [ -n "${DECODE_SMALL:-}" ]; then
  export TRITON_INTERPRET=1 SPMD_MOE_DECODE_INTERPRET=1
  timeout 120 python3 -m spmd_moe.apps.bench.decode --alternate --small --tokens 1 3 --rounds 2 --reps 2 \
    --slot-max-t 1 --alt-variants tiled slot_pdl --out "$OUT/decode_gpu.json" 2> "$OUT/decode.log" >/dev/null
  echo "dry-run bench rc=$? in $((SECONDS - t0)) s"
  python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-400
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
# (Run 2, 23:47, wrote nothing in 97 s: 8 stacked layers seeded on the host; now copies, JSON after each step.)
timeout 95 python3 -m spmd_moe.apps.bench.decode --alternate --out "$OUT/decode_gpu.json" \
  --tokens 1 8 64 --alt-variants tiled tiled_pdl slot_pdl \
  --rounds 9 --reps 200 --slot-max-t 1 --stack 8 --profile-tokens 1 2> "$OUT/decode.log" >/dev/null
echo "bench rc=$? in $((SECONDS - t0)) s"
T=tests/test_decode_kernels.py
left=$((142 - (SECONDS - t0))); [ $left -gt 45 ] && left=45
if [ $left -ge 8 ]; then  # the CUDA tests in the time left (~3 s of compiles a test), most telling first
  echo "== pytest" >> "$OUT/decode.log"
  timeout $left python3 -m pytest -q -p no:cacheprovider -rf \
    "$T::test_slot_is_bitwise_the_tiled_kernels_at_t1" "$T::test_pdl_changes_no_bit_eager_or_in_a_graph[1-slot]" \
    "$T::test_router_kernel_is_gate_plus_route_bitwise[False]" "$T::test_slot_counters_reset_and_calls_repeat" \
    "$T::test_pdl_changes_no_bit_eager_or_in_a_graph[5-tiled]" "$T::test_slot_matches_torch_path[softmax_norm_bias-1]" \
    "$T::test_slot_local_experts_and_counted_rows[1]" "$T::test_slot_every_token_on_the_same_experts" \
    "$T::test_fast_decode_matches_torch_path[softmax-1]" "$T::test_fast_decode_matches_torch_path[softmax_norm_bias-8]" \
    >> "$OUT/decode.log" 2>&1
  echo "pytest rc=$? (cap $left s) at $((SECONDS - t0)) s:"
  sed -n '/== pytest/,$p' "$OUT/decode.log" | grep -E "passed|failed|FAILED|Error|differs" | tail -6 | cut -c1-300
fi
python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-600
