#!/bin/bash
# Lead's session-5 batch (one call, < 560 s) on nvidia-h200-x4 (or -x2):
#  A (parallel): GPU0: the batch-invariance CUDA tests, then the invariant router-tile sweep
#                (SWEEP=1 invariant.sh; or FULL=1 with INV=full);
#                GPUs 2,3 (GPU1 on x2): tp2ep quick at n=2 (issue 13, the partial-sum fix re-measured).
#  B: tp2ep quick at n=all GPUs when there are more than 2 (issue 13 at EP=4).
# Everything lands in $OUT/batch.tgz (the 8-file limit), summaries on stdout.
set -u
source scripts/gpu/common.sh
FINAL=$OUT; T0=$SECONDS; rm -rf /tmp/b; mkdir -p /tmp/b/{inv,tp2,tpn}
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
TP2_GPUS=$([ "$NG" -ge 4 ] && echo 2,3 || echo 1)
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/b/inv CUBLAS_WORKSPACE_CONFIG=:4096:8
 timeout 150 python3 -m pytest -v -s -p no:cacheprovider tests/test_batch_invariance.py \
   tests/test_batch_invariance_decode.py -k cuda > /tmp/b/inv/pytest.log 2>&1; echo "pytest rc=$?" >> /tmp/b/inv/pytest.log
 if [ "${INV:-sweep}" = full ]; then FULL=1 timeout 430 bash scripts/gpu/invariant.sh > /tmp/b/inv.txt 2>&1
 else SWEEP=1 SWEEP_S=${SWEEP_S:-200} timeout 300 bash scripts/gpu/invariant.sh > /tmp/b/inv.txt 2>&1; fi) &
if [ "$NG" -ge 2 ] && [ "${TP:-1}" = 1 ]; then
  (CUDA_VISIBLE_DEVICES=$TP2_GPUS OUT=/tmp/b/tp2 TP_SIZES=2 timeout 220 bash scripts/gpu/tp2ep.sh > /tmp/b/tp2.txt 2>&1) &
fi
wait; echo "== parallel part $((SECONDS-T0)) s"
if [ "$NG" -gt 2 ] && [ "${TP:-1}" = 1 ]; then
  OUT=/tmp/b/tpn timeout 200 bash scripts/gpu/tp2ep.sh > /tmp/b/tpn.txt 2>&1; echo "== tp2ep n=$NG rc=$? total $((SECONDS-T0)) s"
fi
tar czf "$FINAL/batch.tgz" -C /tmp b
echo "===== INVARIANT TESTS"; grep -E "PASSED|FAILED|ERROR|rc=|passed|failed|Error" /tmp/b/inv/pytest.log | tail -14 | cut -c1-300
echo "===== INVARIANT"; tail -16 /tmp/b/inv.txt | cut -c1-400
echo "===== TP2EP n=2"; grep -v "^\[tp2ep" /tmp/b/tp2.txt 2>/dev/null | tail -24 | cut -c1-400
echo "===== TP2EP n=$NG"; grep -v "^\[tp2ep" /tmp/b/tpn.txt 2>/dev/null | tail -24 | cut -c1-400
