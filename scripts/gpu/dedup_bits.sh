#!/bin/bash
# Session 5 H3 (shared Triton helpers, spmd_moe/kernels/_triton_common.py): the CUDA tests of
# every kernel whose source now calls a shared helper, natively in bf16/fp32, < 120 s:
#   fused combine == the unfused torch path, bitwise (slot_row);
#   the partial-sum kernel vs torch and the sum over ranks (slot_row);
#   the invariant decode form == the general path, bitwise, one binary per tile config, graph capture
#     (route_scores/route_topk in the invariant route kernel);
#   the decode kernels (route, up/down, split variants, local experts) vs the torch path.
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/dedup_bits.sh")
# Writes $OUT/dedup_bits.log; prints the pytest summary.
set -u
source scripts/gpu/common.sh
LOG="$OUT/dedup_bits.log"
t0=$SECONDS
nvidia-smi --query-gpu=name --format=csv,noheader > "$LOG" 2>&1
timeout 115 python3 -m pytest -q -p no:cacheprovider -rf \
  tests/test_fused_combine.py tests/test_batch_invariance_decode.py tests/test_decode_kernels.py \
  tests/test_ep_overlap.py::test_interp_partial_sums_kernel_matches_torch \
  tests/test_ep_overlap.py::test_interp_partial_sum_over_ranks_matches_torch \
  -k "(cuda or fused or partial or split or local or (matches_torch_path and (-1] or -3]))) and not pdl" >> "$LOG" 2>&1
echo "pytest rc=$? in $((SECONDS - t0)) s:"; grep -E "passed|failed|FAILED|rror" "$LOG" | tail -8
