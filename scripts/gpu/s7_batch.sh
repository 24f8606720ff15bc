#!/bin/bash
# Session 7, one call on nvidia-h200-x2 (< 420 s): the gather-fused up projection's sweep and
# layer check (gather_gemm.sh, GPU 0), issue 12's acceptance bench alone on GPU 0
# (bench_full.sh: bench --json --full + profile), then issue 13's EP=2 table (tp2ep.sh quick).
# Everything lands in $OUT/s7.tgz (the device returns at most 8 files).
#   run(kind=nvidia-h200-x2, carry=[".whl"], command="bash scripts/gpu/s7_batch.sh")
set -u
FINAL=$OUT; export OUT=/tmp/s7out; mkdir -p $OUT
[ "${GG:-1}" = 1 ] && { GG_BENCH_S=110 GG_TOTAL_S=140 bash scripts/gpu/gather_gemm.sh > $OUT/gg.txt 2>&1; tail -12 $OUT/gg.txt | cut -c1-600; }
[ "${BF:-1}" = 1 ] && { CUDA_VISIBLE_DEVICES=0 bash scripts/gpu/bench_full.sh > $OUT/bf.txt 2>&1; tail -22 $OUT/bf.txt | cut -c1-400; }
[ "${TP:-1}" = 1 ] && { bash scripts/gpu/tp2ep.sh > $OUT/tp.txt 2>&1; grep -E "^\| (4096|16384|8|64) \||^profile_fwd_new |^a2a alone" $OUT/tp.txt | head -14 | cut -c1-400; }
tar czf $FINAL/s7.tgz -C $OUT .
