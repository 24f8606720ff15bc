#!/bin/bash
# The CUDA runs of every test file with a CUDA path (parity of the fast kernels against their
# references, CUDA-graph capture, batch invariance, torchtitan), on one GPU, 6 pytest workers
# (pytest-xdist; the files' CPU-only cases skip themselves there).
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/cuda_tests.sh")   (< 540 s)
# Writes $OUT/cuda_tests.log (pytest -rfEs) and prints the summary.
set -u
source scripts/gpu/common.sh
with_torchtitan
FILES=${FILES:-"test_gather_gemm test_fast_route test_fused_backward test_fused_combine test_decode_kernels test_cuda_capture
  test_batch_invariance test_batch_invariance_decode test_replicated_decode test_ep_overlap test_sync_free_ep test_torchtitan_moe
  test_torchtitan_trainer test_copy_engine"}
args=""; for f in $FILES; do args="$args tests/$f.py"; done
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${CAP:-520} python3 -m pytest -q -n ${WORKERS:-6} -p no:cacheprovider -rfE --durations=8 $args > "$OUT/cuda_tests.log" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/cuda_tests.log" | tail -25 | cut -c1-400
