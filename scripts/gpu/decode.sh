#!/bin/bash
# Issue 12 decode kernels on one GPU, session 6, < 150 s in all:
#  1. CUDA run of 12 chosen tests of tests/test_decode_kernels.py (<= 42 s; run 1 showed ~3 s of compiles a
#     test): the one-kernel router vs gate + route (bitwise), slot_sep vs tiled at T=1 (bitwise), tiled with the
#     fused router vs tiled (bitwise), PDL + CUDA graph replays, counters reset, slot vs torch path, EP arguments.
#  2. python -m spmd_moe.apps.bench.decode --alternate (the rest of the 140 s): T = 1, 8, 64 (slot* at T = 1 only:
#     above, an expert picked by several tokens is read once per token; kernel profile at T=1 only);
#     every variant's CUDA graph captured once, then timed in turn, 9 rounds (A B C D E A B C D E ...), median
#     of the rounds' medians, x HBM floor, diffs vs the torch path, per-kernel device times. Two timings each:
#     one layer a graph replay (as in sessions 3-5: includes the input copy kernel and the graph launch, so
#     host-sensitive at T=1) and, second line, "per layer of 8 in one graph": 8 distinct layers (own weights)
#     on 8 inputs captured in ONE graph, replay / 8 (a model's decode step; no copy, one launch). Variants:
#       tiled          the 5 kernels of session 3 (gate, route, up, down, combine)
#       tiled_pdl      the same with programmatic dependent launch
#       tiled_fr_pdl   ROUTER['fused']: router_kernel (gate + route + plan) + tiled up/down/combine: 4 kernels
#       slot_sep_pdl   SLOT (up_dot, down_sep, TILES' tiles): router_kernel, up per slot, down per slot, combine;
#                      the tiled arithmetic at T=1 with one dependent read per program instead of the plan's chain
#       slot_sep_s4_pdl  slot_sep_pdl with 4 pipeline stages (session 4's best sweep entry, unconfirmed)
#       slot_pre_pdl   slot_sep_pdl whose down kernel reads its [16, F] w2 block BEFORE its PDL wait: the down
#                      weights stream while the up kernel runs (one tl.dot over F: tolerance, not bitwise)
#       slot_pre_gp_pdl  slot_pre_pdl whose router_kernel also reads its gate rows before its PDL wait (ROUTER
#                      ['gate_pre']; the same logits): they stream while the previous kernel finishes
#       slot_flat_pdl  SLOT (up_dot, down_flat): router_kernel, up per slot, down + combine in one flat loop: 3 kernels
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
    --slot-max-t 1 --alt-variants tiled tiled_pdl slot_sep_pdl slot_pre_pdl tiled_fr_pdl --out "$OUT/decode_gpu.json" 2> "$OUT/decode.log" >/dev/null
  echo "dry-run bench rc=$? in $((SECONDS - t0)) s"
  python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-400
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
# Run 2 (23:47): the bench wrote nothing in 97 s (8 stacked layers seeded on the host, 8 variants): now the
# stacked layers are copies, 5 variants, the JSON is rewritten after every variant and round, bench FIRST.
timeout 95 python3 -m spmd_moe.apps.bench.decode --alternate --out "$OUT/decode_gpu.json" \
  --tokens 1 8 64 --alt-variants tiled tiled_pdl slot_sep_pdl slot_pre_pdl tiled_fr_pdl \
  --rounds 9 --reps 200 --slot-max-t 1 --stack 8 --profile-tokens 1 2> "$OUT/decode.log" >/dev/null
echo "bench rc=$? in $((SECONDS - t0)) s"
T=tests/test_decode_kernels.py
left=$((142 - (SECONDS - t0))); [ $left -gt 45 ] && left=45
if [ $left -ge 8 ]; then  # the CUDA tests in the time left (~3 s of compiles a test), most telling first
  echo "== pytest" >> "$OUT/decode.log"
  timeout $left python3 -m pytest -q -p no:cacheprovider -rf \
    "$T::test_slot_sep_is_bitwise_the_tiled_kernels_at_t1" "$T::test_pdl_changes_no_bit_eager_or_in_a_graph[1-slot_pre]" \
    "$T::test_pdl_changes_no_bit_eager_or_in_a_graph[1-slot_sep]" "$T::test_router_kernel_is_gate_plus_route_bitwise[False]" \
    "$T::test_tiled_with_fused_router_is_bitwise_the_tiled[1]" "$T::test_pdl_changes_no_bit_eager_or_in_a_graph[5-tiled_fr]" \
    "$T::test_slot_counters_reset_and_calls_repeat" "$T::test_slot_matches_torch_path[4-softmax_norm_bias-1]" \
    "$T::test_slot_local_experts_and_counted_rows[5-3]" "$T::test_slot_local_experts_and_counted_rows[5-4]" \
    "$T::test_tiled_with_fused_router_is_bitwise_the_tiled[17]" "$T::test_slot_matches_torch_path[3-sigmoid_norm_shared-1]" \
    >> "$OUT/decode.log" 2>&1
  echo "pytest rc=$? (cap $left s) at $((SECONDS - t0)) s:"
  sed -n '/== pytest/,$p' "$OUT/decode.log" | grep -E "passed|failed|FAILED|Error|differs" | tail -6 | cut -c1-300
fi
python3 -m spmd_moe.apps.bench.decode --summarize "$OUT/decode_gpu.json" 2>&1 | cut -c1-600
