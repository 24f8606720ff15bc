#!/bin/bash
# Lead's session-5 final batch (one call, <= 300 s) on nvidia-h200-x2 (phases B/C skipped on one GPU):
#  A (parallel, <= 135 s): GPU0: dedup_bits.sh (shared Triton helpers: combine, partial, decode and
#      invariant route kernels, bitwise tests) then the batch-invariance CUDA tests;
#      GPU1: fused_bwd.sh (training kernels, grad_w default 'torch') then prefill_fwd.sh (fused SwiGLU inference).
#  B (<= 75 s): ep_pad_check.sh (EP fwd+bwd without pad copies: bitwise vs the old padding, time saved).
#  C (<= 80 s): tp2ep.sh quick at n=2 (per-GPU ratios, profiles).
# Everything lands in $OUT/batch3.tgz, summaries on stdout.
set -u
source scripts/gpu/common.sh
export CUBLAS_WORKSPACE_CONFIG=:4096:8
FINAL=$OUT; T0=$SECONDS; rm -rf /tmp/b3; mkdir -p /tmp/b3/{g0,g1,ep,tp}
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
G1=$([ "$NG" -ge 2 ] && echo 1 || echo 0)
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/b3/g0
 timeout 112 bash scripts/gpu/dedup_bits.sh > /tmp/b3/g0/dedup.txt 2>&1
 timeout $((133 - (SECONDS - T0))) python3 -m pytest -q -p no:cacheprovider -rf tests/test_batch_invariance.py \
   -k cuda > /tmp/b3/g0/inv_pytest.log 2>&1; echo "inv pytest rc=$?" >> /tmp/b3/g0/inv_pytest.log) &
(export CUDA_VISIBLE_DEVICES=$G1 OUT=/tmp/b3/g1
 timeout 75 bash scripts/gpu/fused_bwd.sh > /tmp/b3/g1/fused_bwd.txt 2>&1
 timeout $((133 - (SECONDS - T0))) bash scripts/gpu/prefill_fwd.sh > /tmp/b3/g1/prefill.txt 2>&1) &
wait; echo "== A $((SECONDS-T0)) s"
if [ "$NG" -ge 2 ]; then
  OUT=/tmp/b3/ep timeout 75 bash scripts/gpu/ep_pad_check.sh > /tmp/b3/ep/ep.txt 2>&1; echo "== B $((SECONDS-T0)) s"
  OUT=/tmp/b3/tp TP_SIZES=2 timeout 80 bash scripts/gpu/tp2ep.sh > /tmp/b3/tp/tp.txt 2>&1; echo "== C $((SECONDS-T0)) s"
fi
tar czf "$FINAL/batch3.tgz" -C /tmp b3
echo "===== DEDUP"; tail -6 /tmp/b3/g0/dedup.txt | cut -c1-250
echo "===== INV"; grep -E "passed|failed|rc=" /tmp/b3/g0/inv_pytest.log | tail -3
echo "===== FUSED_BWD"; grep -E "pytest rc|passed|failed|T=|goal" /tmp/b3/g1/fused_bwd.txt | cut -c1-330 | tail -9
echo "===== PREFILL"; tail -12 /tmp/b3/g1/prefill.txt | cut -c1-300
echo "===== EP"; tail -8 /tmp/b3/ep/ep.txt 2>/dev/null | cut -c1-600
echo "===== TP2EP"; grep -v "^\[tp2ep" /tmp/b3/tp/tp.txt 2>/dev/null | grep -E "^\| (4096|16384|8|64) |profile_prefill_fwdbwd|rc=" | cut -c1-330
