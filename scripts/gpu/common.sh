# Sourced by scripts/gpu/*.sh on the device machine: carried wheels, environment, $OUT.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -f /tmp/site/.done ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
# torchtitan 0.3.0 and its pure-Python dependencies from the carried wheels (for the scripts
# that compare with torchtitan's MoE or run its tests): installed into /tmp/site_tt.
with_torchtitan() {
  if [ -d .whl/torchtitan ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_tt .whl/torchtitan/*.whl 2>&1 | grep -v "already exists" | tail -2
    export PYTHONPATH=$PYTHONPATH:/tmp/site_tt
  fi
}
