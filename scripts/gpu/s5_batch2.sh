#!/bin/bash
# Lead's session-5 second batch (one call, < 560 s) on nvidia-h200-x4 (or -x2):
#  A (parallel): GPU0: torchtitan's Trainer, native vs spmd_moe (now with the fused training
#                kernels), 100 steps eager (issue 15's bitwise check);
#                GPUs 2,3 (on x2: after the Trainer, both GPUs): tp2ep quick at n=2 (issue 13, fused training kernels in).
#  B: tp2ep quick at n=all GPUs when there are more than 2.
# Everything lands in $OUT/batch2.tgz, summaries on stdout.
set -u
source scripts/gpu/common.sh
FINAL=$OUT; T0=$SECONDS; rm -rf /tmp/b2; mkdir -p /tmp/b2/{tt,tp2,tpn}
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
TP2_GPUS=$([ "$NG" -ge 4 ] && echo 2,3 || echo 1)
(CUDA_VISIBLE_DEVICES=0 OUT=/tmp/b2/tt TT_MODES=eager BUDGET=${TT_BUDGET:-330} RUN_TIMEOUT=130 timeout 350 \
   bash scripts/gpu/torchtitan_train.sh > /tmp/b2/tt.txt 2>&1) &
if [ "$NG" -ge 4 ]; then
  (CUDA_VISIBLE_DEVICES=$TP2_GPUS OUT=/tmp/b2/tp2 TP_SIZES=2 timeout 220 bash scripts/gpu/tp2ep.sh > /tmp/b2/tp2.txt 2>&1) &
fi
sleep 1; wait; echo "== parallel part $((SECONDS-T0)) s"
if [ "$NG" -ge 2 ] && [ "$NG" -lt 4 ]; then  # x2: after the Trainer, on both GPUs
  OUT=/tmp/b2/tp2 TP_SIZES=2 timeout 200 bash scripts/gpu/tp2ep.sh > /tmp/b2/tp2.txt 2>&1; echo "== tp2ep n=2 rc=$? total $((SECONDS-T0)) s"
fi
if [ "$NG" -gt 2 ]; then
  OUT=/tmp/b2/tpn timeout 170 bash scripts/gpu/tp2ep.sh > /tmp/b2/tpn.txt 2>&1; echo "== tp2ep n=$NG rc=$? total $((SECONDS-T0)) s"
fi
tar czf "$FINAL/batch2.tgz" -C /tmp b2
echo "===== TT"; tail -22 /tmp/b2/tt.txt | cut -c1-300
echo "===== TP2EP n=2"; grep -v "^\[tp2ep" /tmp/b2/tp2.txt 2>/dev/null | grep -E "^\| (4096|16384)|profile_prefill_fwdbwd" | cut -c1-300
echo "===== TP2EP n=$NG"; grep -v "^\[tp2ep" /tmp/b2/tpn.txt 2>/dev/null | grep -E "^\| (4096|16384)|profile_prefill_fwdbwd" | cut -c1-300
