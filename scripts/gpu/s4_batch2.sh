#!/bin/bash
# Lead's session-4 second batch on nvidia-h200-x2 (< 560 s): torchtitan eager on GPU0 while
# decode.sh then invariant.sh run on GPU1; then tp2ep.sh on both. Everything lands in
# $OUT/batch2.tgz (the 8-file limit), summaries on stdout.
set -u
source scripts/gpu/common.sh
FINAL=$OUT; T0=$SECONDS; mkdir -p /tmp/b2/{tt,dec,inv,tp}
(CUDA_VISIBLE_DEVICES=0 OUT=/tmp/b2/tt TT_MODES=eager BUDGET=300 RUN_TIMEOUT=100 timeout 320 \
   bash scripts/gpu/torchtitan_train.sh > /tmp/b2/tt.txt 2>&1) &
(CUDA_VISIBLE_DEVICES=1 OUT=/tmp/b2/dec timeout 160 bash scripts/gpu/decode.sh > /tmp/b2/dec.txt 2>&1
 CUDA_VISIBLE_DEVICES=1 OUT=/tmp/b2/inv timeout 155 bash scripts/gpu/invariant.sh > /tmp/b2/inv.txt 2>&1) &
wait; echo "== parallel part $((SECONDS-T0)) s"
OUT=/tmp/b2/tp timeout 200 bash scripts/gpu/tp2ep.sh > /tmp/b2/tp.txt 2>&1; echo "== tp2ep rc=$? total $((SECONDS-T0)) s"
tar czf "$FINAL/batch2.tgz" -C /tmp b2
echo "===== TT"; tail -22 /tmp/b2/tt.txt | cut -c1-300
echo "===== DECODE"; tail -30 /tmp/b2/dec.txt | cut -c1-300
echo "===== INVARIANT"; tail -16 /tmp/b2/inv.txt | cut -c1-300
echo "===== TP2EP"; grep -v "^\[tp2ep" /tmp/b2/tp.txt | tail -30 | cut -c1-400
