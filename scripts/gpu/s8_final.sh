#!/bin/bash
# Session 8's acceptance run for issue 13 (one nvidia-h200-x2 call, < 600 s): tp2ep.sh's
# sync-free section at EP=2 for T = 4096, 8192, 16384 tokens per GPU (the library's
# default against local first forced, over copy engines and over NCCL, every segment
# exchanged, 2 pieces, the split-size path; fwd, f+b, CUDA graphs, sync-debug, profiles,
# decode), then every CUDA test file (both GPUs present: the world-2 tests run too).
#   run(kind=nvidia-h200-x2, carry=[".whl"], command="bash scripts/gpu/s8_final.sh")
# Writes $OUT/tp2ep_sf_2gpu.json / .log and $OUT/cuda_tests.log; prints the tables.
set -u
source scripts/gpu/common.sh
SF_CAP=${SF_CAP:-240} SF=1 SF_T="${SF_T:-4096 8192 16384}" bash scripts/gpu/tp2ep.sh 2>&1 | tail -60
CAP=${CAP:-300} bash scripts/gpu/cuda_tests.sh
