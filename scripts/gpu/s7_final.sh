#!/bin/bash
# Session 7's closing call on one H200 (< 480 s): the gather-fused projection's sweep and layer
# check (gather_gemm.sh, no pytest), issue 12's acceptance bench (bench_full.sh), then the CUDA
# test files of the kernels this session touched (cuda_tests.sh). Everything in $OUT/s7f.tgz.
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/s7_final.sh")
set -u
FINAL=$OUT; export OUT=/tmp/s7f; mkdir -p $OUT
GG_BENCH_S=100 GG_TOTAL_S=0 bash scripts/gpu/gather_gemm.sh > $OUT/gg.txt 2>&1; tail -9 $OUT/gg.txt | cut -c1-500
bash scripts/gpu/bench_full.sh > $OUT/bf.txt 2>&1; tail -22 $OUT/bf.txt | cut -c1-300
FILES="test_gather_gemm test_fast_route test_fused_backward test_fused_combine test_decode_kernels test_cuda_capture
  test_ep_overlap test_sync_free_ep test_torchtitan_moe test_replicated_decode" CAP=${TEST_CAP:-230} bash scripts/gpu/cuda_tests.sh 2>&1 | tail -8
tar czf $FINAL/s7f.tgz -C $OUT .
