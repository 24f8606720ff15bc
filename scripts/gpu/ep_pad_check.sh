#!/bin/bash
# Issue 13 (H2, session 5): EP fwd+bwd on 2 GPUs, the padded rows without copies vs the
# old padding (emulated in-process): bitwise flags (fwd, grad_x, every weight grad) and
# fwd+bwd ms of both, T=4096 and 16384 per GPU, kernels 'fast' and 'torchtitan'. ~60 s.
#   run(kind=nvidia-h200-x2, carry=[".whl"], command="bash scripts/gpu/ep_pad_check.sh")
# Writes $OUT/ep_pad_check.json and $OUT/ep_pad_check.log.
set -u
source scripts/gpu/common.sh
timeout 150 torchrun --nproc-per-node 2 scripts/gpu/ep_pad_check.py --out "$OUT/ep_pad_check.json" > "$OUT/ep_pad_check.log" 2>&1
echo "rc=$?"; grep -E '^\{' "$OUT/ep_pad_check.log" || tail -30 "$OUT/ep_pad_check.log"
