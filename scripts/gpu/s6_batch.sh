#!/bin/bash
# Lead's session-6 batch (one call, <= 420 s) on nvidia-h200-x2 (phase B skipped on one GPU):
#  A (parallel; SEQ=1: one after the other, decode first, each <= ${CAP_A:-150} s): GPU0: ${A0:-prefill_fwd.sh} (issue 12 prefill: the fast router);
#      GPU1: ${A1:-decode.sh} (issue 12 decode T=1); then, where time is left, ${A0B:-} / ${A1B:-}.
#  B (<= ${CAP_B:-200} s): tp2ep.sh at n=2 (issue 13: the sync-free exchange against the old path).
# Everything lands in $OUT/b6.tgz, summaries on stdout.
set -u
source scripts/gpu/common.sh
FINAL=$OUT; T0=$SECONDS; rm -rf /tmp/b6; mkdir -p /tmp/b6/{g0,g1,tp}
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
G1=$([ "$NG" -ge 2 ] && echo 1 || echo 0)
CAP_A=${CAP_A:-150}
a0() { export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/b6/g0
 timeout $CAP_A bash scripts/gpu/${A0:-prefill_fwd.sh} > /tmp/b6/g0/a0.txt 2>&1; echo "rc=$? at $((SECONDS-T0)) s" >> /tmp/b6/g0/a0.txt
 if [ -n "${A0B:-}" ] && [ $((CAP_A - (SECONDS - T0))) -gt 20 ]; then
   timeout $((CAP_A - (SECONDS - T0))) bash scripts/gpu/$A0B > /tmp/b6/g0/a0b.txt 2>&1; echo "rc=$?" >> /tmp/b6/g0/a0b.txt; fi; }
a1() { export CUDA_VISIBLE_DEVICES=$G1 OUT=/tmp/b6/g1
 timeout $CAP_A bash scripts/gpu/${A1:-decode.sh} > /tmp/b6/g1/a1.txt 2>&1; echo "rc=$? at $((SECONDS-T0)) s" >> /tmp/b6/g1/a1.txt
 if [ -n "${A1B:-}" ] && [ $((CAP_A - (SECONDS - T0))) -gt 20 ]; then
   timeout $((CAP_A - (SECONDS - T0))) bash scripts/gpu/$A1B > /tmp/b6/g1/a1b.txt 2>&1; echo "rc=$?" >> /tmp/b6/g1/a1b.txt; fi; }
if [ "$NG" -ge 2 ] && [ "${SEQ:-0}" = 0 ]; then (a0) & (a1) &
else (a1); (a0)  # one GPU, or SEQ=1: one job at a time (T=1 decode graphs are host-sensitive)
fi
wait; echo "== A $((SECONDS-T0)) s"
if [ "$NG" -ge 2 ] && [ "${SKIP_B:-0}" = 0 ]; then
  OUT=/tmp/b6/tp TP_SIZES=2 timeout ${CAP_B:-200} bash scripts/gpu/tp2ep.sh > /tmp/b6/tp/tp.txt 2>&1; echo "== B rc=$? $((SECONDS-T0)) s"
fi
tar czf "$FINAL/b6.tgz" -C /tmp b6
for f in /tmp/b6/g0/a0.txt /tmp/b6/g0/a0b.txt /tmp/b6/g1/a1.txt /tmp/b6/g1/a1b.txt; do
  [ -f $f ] && { echo "===== $f"; tail -${TAILN:-14} $f | cut -c1-300; }
done
[ -f /tmp/b6/tp/tp.txt ] && { echo "===== TP2EP"; tail -${TAILN_TP:-25} /tmp/b6/tp/tp.txt | cut -c1-300; }
