#!/usr/bin/env bash
# Issue 15 GPU check: torchtitan 0.3.0's own launcher (torchrun -m torchtitan.train, through
# the launcher file written below) trains Qwen3 debugmodel_moe with torchtitan's MoE and with
# spmd_moe's (one flag: --override.imports spmd_moe.integrations.torchtitan.overrides.spmd_moe),
# same seed and data, STEPS steps each, CUDA graphs on (torchtitan's default) and off, plus a
# repeat of the native run for the native-vs-native noise. Writes $OUT/<run>.jsonl (torchtitan's
# per-step metrics), $OUT/<run>.log and $OUT/summary.json.
#
# One H200 (torch 2.11+cu130, no torchtitan there): the torchtitan wheels travel in .whl/
# (see the download commands in the header of docs/torchtitan.md's GPU section).
# Sizes chosen to end within 8 minutes: debugmodel_moe (8 layers, D=256, E=64, top-8, F=768,
# vocab 2048), batch 4 x seq 2048 = 8192 tokens a step, 100 steps, 5 runs of ~1 min
# (a run that could not end by BUDGET=450 s is skipped and listed in failures).
#
# CPU smoke of everything but the GPU (the lead's GPU run is a confirmation):
#   TT_CPU=1 STEPS=3 SEQ=64 BATCH=2 PY=.venv/bin/python bash scripts/gpu/torchtitan_train.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:=out/torchtitan_train}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=${STEPS:-100}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-4}
PY=${PY:-python3}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}   # seconds per run (expected ~60: start, flex-mask compile, 100 steps)
BUDGET=${BUDGET:-450}             # a run starts only if it can end (RUN_TIMEOUT) by then
TT_CPU=${TT_CPU:-0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$TT_CPU" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true
  # torchtitan + what it needs that the image lacks; spmd_types + beartype for spmd_moe.
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site" \
    .whl/spmd_types-*.whl .whl/beartype-*.whl .whl/torchtitan/*.whl
fi
export PYTHONPATH="$PWD:$WORK:$WORK/site:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF' | tee "$OUT/versions.txt"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
for p in ("torchtitan", "spmd_types", "datasets", "tyro", "torchdata", "tokenizers", "pyarrow", "fsspec"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "MISSING")
EOF

# Local tokenizer + corpus (the torchtitan wheel ships neither c4_test nor its test tokenizer).
$PY -m spmd_moe.integrations.torchtitan.tiny_assets "$WORK/assets" --docs 20000 > /dev/null

cat > "$WORK/tt_gpu_launch.py" <<'EOF'
"""torchtitan.train's main, after compatibility shims for torch 2.11 (torchtitan 0.3.0 targets
a newer torch). BENCHMARK-ONLY monkeypatches: each is applied only when torch lacks the
feature, and none changes what either model computes. Also records torchtitan's per-step
metrics (the dict its MetricsProcessor hands its loggers) to $TT_METRICS."""
import dataclasses
import functools
import inspect
import json
import os
from typing import Any

import torch
import torch.distributed as dist

PATCHES = []

if os.environ.get("TT_CPU") == "1":
    # TT_CPU=1 (the CPU smoke of this script): torchtitan has no CPU device type; use the
    # stand-in of tests/test_torchtitan_trainer.py, set before torchtitan's modules read it.
    import torchtitan.tools.utils as _tu
    from test_torchtitan_trainer import _CpuDevice
    if _tu.device_type != "cpu":
        _tu.device_type, _tu.device_module = "cpu", _CpuDevice()

# 1. torchtitan/distributed/{fsdp,full_dtensor}.py import DataParallelMeshDims at module level.
#    One GPU with spmd_backend=spmd_types: resolve_fsdp_mesh returns dims=None for the size-1
#    mesh, so the class is never built; the stand-in only lets the import succeed.
import torch.distributed.fsdp as _fsdp
if not hasattr(_fsdp, "DataParallelMeshDims"):
    @dataclasses.dataclass
    class DataParallelMeshDims:  # import-only stand-in
        shard: Any = None
        replicate: Any = None
    _fsdp.DataParallelMeshDims = DataParallelMeshDims
    PATCHES.append("DataParallelMeshDims stand-in")

# 2. Trainer.train calls torch.distributed.set_timeout after step 1; torch's private
#    _set_pg_timeout does the same job.
if not hasattr(dist, "set_timeout"):
    from torch.distributed.distributed_c10d import _set_pg_timeout
    dist.set_timeout = lambda timeout, group=None: _set_pg_timeout(timeout, group)
    PATCHES.append("set_timeout -> _set_pg_timeout")

# 3. torchtitan's flex-attention masks pass separate_full_blocks=True to create_block_mask;
#    a torch without the argument always separates full blocks, which is what True asks.
import torch.nn.attention.flex_attention as _flex
if not getattr(_flex.create_block_mask, "_tt_shim", False) and (
        "separate_full_blocks" not in inspect.signature(_flex.create_block_mask, follow_wrapped=False).parameters):
    _orig_cbm = _flex.create_block_mask

    @functools.wraps(_orig_cbm)
    def _create_block_mask(*args, separate_full_blocks=True, **kwargs):
        return _orig_cbm(*args, **kwargs)
    _create_block_mask._tt_shim = True
    _flex.create_block_mask = _create_block_mask
    PATCHES.append("create_block_mask without separate_full_blocks")

# 4. torchtitan's ChunkedLossWrapper failed in backward on torch 2.11 (issue 15): both runs
#    use its inner loss (cross-entropy, sum over tokens / global valid tokens, the same
#    normalization) through torchtitan's own override mechanism, listed in --override.imports.
from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.config.override import override


@override(target=ChunkedLossWrapper.Config, description="unchunked cross-entropy (torch 2.11)")
def plain_cross_entropy(cfg):
    return cfg.loss_fn


def _tap_metrics():
    from torchtitan.components.metrics import BaseLogger
    path = os.environ["TT_METRICS"]

    def log(self, metrics, step):
        if dist.get_rank() == 0:
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
    BaseLogger.log = log  # no logger is enabled: BaseLogger.log is torchtitan's no-op


if __name__ == "__main__":
    _tap_metrics()
    print("tt_gpu_launch patches:", PATCHES or "none", flush=True)
    from torchtitan.train import main
    main()
EOF

if [ "$TT_CPU" = 1 ]; then
  # CPU: the tiny flavor (flex attention has no CPU backward); graphs are GPU-only.
  CONFIG=(--module spmd_moe.integrations.torchtitan --config qwen3_moe_tiny)
  NATIVE_CONFIG=(--module test_torchtitan_trainer --config tiny_native)
  GRAPH_MODES=(eager)
else
  CONFIG=(--module qwen3 --config qwen3_moe_debug)
  NATIVE_CONFIG=("${CONFIG[@]}")
  GRAPH_MODES=(${TT_MODES:-graphs eager})  # TT_MODES=eager: eager runs only (native twice, spmd)
fi
SPMD_FLAG="spmd_moe.integrations.torchtitan.overrides.spmd_moe"
LOSS_FLAG="tt_gpu_launch.plain_cross_entropy"

run() {  # run TAG IMPL(native|spmd) MODE(graphs|eager)
  local tag=$1 impl=$2 mode=$3 cfg imports extra=()
  if [ $((SECONDS + RUN_TIMEOUT)) -gt "$BUDGET" ]; then
    echo "skip $tag (${SECONDS}s + ${RUN_TIMEOUT}s > ${BUDGET}s)"; echo "{\"run\": \"$tag\", \"skipped\": true}" >> "$OUT/failures.jsonl"; return
  fi
  if [ "$impl" = spmd ]; then
    cfg=("${CONFIG[@]}"); imports="$LOSS_FLAG,$SPMD_FLAG"   # the one spmd_moe flag
  else
    cfg=("${NATIVE_CONFIG[@]}"); imports="$LOSS_FLAG"
  fi
  extra+=(--override.imports "$imports")
  if [ "$mode" = eager ]; then extra+=(--training.disable_cuda_graphs); fi
  rm -f "$OUT/$tag.jsonl"
  local t0=$SECONDS rc=0
  TT_METRICS="$OUT/$tag.jsonl" TT_CPU=$TT_CPU timeout "$RUN_TIMEOUT" \
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 "$WORK/tt_gpu_launch.py" \
      "${cfg[@]}" --hf_assets_path "$WORK/assets/tokenizer" --dataloader.dataset_path "$WORK/assets/corpus" \
      --training.steps "$STEPS" --training.seq_len "$SEQ" --training.local_batch_size "$BATCH" \
      --debug.seed 42 --metrics.log_freq 1 --comm.trace_buf_size 0 --dump_folder "$WORK/dump_$tag" \
      "${extra[@]}" > "$OUT/$tag.log" 2>&1 || rc=$?
  echo "$tag: rc=$rc $((SECONDS - t0))s $(grep -c . "$OUT/$tag.jsonl" 2>/dev/null || echo 0) steps"
  if [ "$rc" != 0 ]; then echo "{\"run\": \"$tag\", \"rc\": $rc}" >> "$OUT/failures.jsonl"; tail -20 "$OUT/$tag.log"; fi
}

rm -f "$OUT/failures.jsonl"
# The noise baseline (native twice) comes third, so a slow machine still gets it.
run "native_${GRAPH_MODES[0]}" native "${GRAPH_MODES[0]}"
run "spmd_${GRAPH_MODES[0]}" spmd "${GRAPH_MODES[0]}"
run "native_${GRAPH_MODES[0]}_repeat" native "${GRAPH_MODES[0]}"
for mode in "${GRAPH_MODES[@]:1}"; do
  run "native_$mode" native "$mode"
  run "spmd_$mode" spmd "$mode"
done

STEPS=$STEPS SEQ=$SEQ BATCH=$BATCH $PY - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for p in sorted(out.glob("*.jsonl")):
    if p.name == "failures.jsonl":
        continue
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    if not rows:
        continue
    steady = [r["throughput(tps)"] for r in rows if r["step"] > 10] or [r["throughput(tps)"] for r in rows]
    runs[p.stem] = {
        "steps": len(rows),
        "loss": [r["loss_metrics/global_avg_loss"] for r in rows],
        "tokens_per_s_median_after_step10": statistics.median(steady),
        "peak_reserved_gib": max(r["memory/max_reserved(GiB)"] for r in rows),
        "peak_active_gib": max(r["memory/max_active(GiB)"] for r in rows),
    }
def max_delta(a, b):
    n = min(len(runs[a]["loss"]), len(runs[b]["loss"]))
    return max(abs(x - y) for x, y in zip(runs[a]["loss"][:n], runs[b]["loss"][:n])) if n else None
cmp = {}
for mode in ("graphs", "eager"):
    n, s = f"native_{mode}", f"spmd_{mode}"
    if n in runs and s in runs:
        cmp[mode] = {
            "step1_loss_native": runs[n]["loss"][0], "step1_loss_spmd": runs[s]["loss"][0],
            "step1_bitwise_equal": runs[n]["loss"][0] == runs[s]["loss"][0],
            "max_abs_loss_delta_spmd_vs_native": max_delta(n, s),
            "tokens_per_s_ratio_spmd_over_native": runs[s]["tokens_per_s_median_after_step10"] / runs[n]["tokens_per_s_median_after_step10"],
            "peak_reserved_ratio_spmd_over_native": (runs[s]["peak_reserved_gib"] / runs[n]["peak_reserved_gib"]
                                                     if runs[n]["peak_reserved_gib"] > 0 else None),  # no stats on CPU
        }
for r in runs:
    if r.endswith("_repeat") and r[: -len("_repeat")] in runs:
        cmp["native_vs_native_max_abs_loss_delta"] = max_delta(r[: -len("_repeat")], r)
failures = [json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()] if (out / "failures.jsonl").exists() else []
import os
summary = {"settings": {k: os.environ.get(k) for k in ("STEPS", "SEQ", "BATCH")}, "runs": runs, "comparison": cmp, "failures": failures}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
for name, r in runs.items():
    print(f"{name:24s} steps {r['steps']:3d}  loss[0] {r['loss'][0]:.6f}  loss[-1] {r['loss'][-1]:.6f}  "
          f"tok/s {r['tokens_per_s_median_after_step10']:,.0f}  peak reserved {r['peak_reserved_gib']:.2f} GiB")
print(json.dumps(cmp, indent=1))
if failures:
    print("FAILURES:", failures)
EOF
echo "total ${SECONDS}s"
