#!/bin/bash
# Issue 15's memory question on one GPU: bytes kept for backward, live and peak memory of
# torchtitan's MoE vs SpmdMoE from the same Config (bf16, training). ~30 s.
#   run(carry=[".whl"], command="bash scripts/gpu/tt_memory.sh")
set -u
source scripts/gpu/common.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_tt .whl/torchtitan/*.whl 2>&1 | tail -2
PYTHONPATH=$PYTHONPATH:/tmp/site_tt timeout 120 python3 -m spmd_moe.apps.bench.tt_memory --out "$OUT/tt_memory.json" 2>&1 \
  | grep -v -i warn | cut -c1-1200
