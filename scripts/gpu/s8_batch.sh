#!/bin/bash
# Session 8, one nvidia-h200-x2 call (issue 13): the copy-engine transport's CUDA tests
# (tests/test_copy_engine.py: both GPUs), then tp2ep.sh's sync-free section at EP=2
# (local first over copy engines vs NCCL vs every segment exchanged, fwd and f+b, graphs,
# sync-debug, profiles) -> $OUT/s8.tgz and the table on stdout.
set -u
source scripts/gpu/common.sh
mkdir -p "$OUT/s8"
timeout 240 python3 -m pytest -q -p no:cacheprovider ${S8_TESTS:-tests/test_copy_engine.py} 2>&1 | tail -25
OUT="$OUT/s8" SF_CAP=${SF_CAP:-320} SF=1 SF_T="${SF_T:-4096 16384}" bash scripts/gpu/tp2ep.sh 2>&1 | tail -80
tar czf "$OUT/s8.tgz" -C "$OUT" s8 && rm -rf "$OUT/s8"
