#!/bin/bash
# One device-machine call: install the carried wheels, then the 1-GPU bench, its profile,
# the CUDA parity tests and (with 2+ GPUs) TP2EP. Results under $OUT.
#   run(kind=nvidia-h100-x2, carry=[".whl"], command="bash scripts/gpu_session.sh")
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-deps --target /tmp/pydeps .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/pydeps:$PWD
STEPS=${STEPS:-"tests bench profile tp2ep"}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > $OUT/gpu.txt 2>&1
nvidia-smi topo -m >> $OUT/gpu.txt 2>&1
cat $OUT/gpu.txt
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
for s in $STEPS; do
  t0=$(date +%s)
  case $s in
    bench) CUDA_VISIBLE_DEVICES=0 python3 -m spmd_moe.apps.bench.run --json --full --plot $OUT/moe_gpu.png --out $OUT/moe_gpu.json > /dev/null 2> $OUT/bench.log; tail -25 $OUT/bench.log ;;
    profile) CUDA_VISIBLE_DEVICES=0 python3 -m spmd_moe.apps.bench.gpu_profile --out $OUT/profile_gpu.json 2> $OUT/profile.log | tail -3; tail -4 $OUT/profile.log | cut -c1-600 ;;
    tests) CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_combine.py tests/test_torchtitan_moe.py tests/test_reference.py 2>&1 | tail -4 ;;
    tp2ep) for ng in ${TP_SIZES:-$NG}; do if [ "$NG" -ge "$ng" ] && [ "$ng" -ge 2 ]; then timeout 300 torchrun --nproc-per-node $ng -m spmd_moe.apps.bench.tp2ep --out $OUT/tp2ep_${ng}gpu.json > /dev/null 2> $OUT/tp2ep_${ng}.log; tail -9 $OUT/tp2ep_${ng}.log | cut -c1-600; fi; done ;;
  esac
  echo "== step $s took $(( $(date +%s) - t0 )) s"
done
python3 - <<'PY'
import json, os
out = os.environ.get("OUT", "/tmp/out")
try:
    from spmd_moe.apps.bench.moe_bench import table
    r = json.load(open(f"{out}/moe_gpu.json"))
    print(table(r)); print(json.dumps(r["targets"])); print("hbm copy GB/s", r["hbm_copy_GBps"]); print("overhead", json.dumps(r.get("overhead"))[:800])
except Exception as e:
    print("no bench table:", e)
PY
