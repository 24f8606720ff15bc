#!/bin/bash
# Issue 14 item 3 (CUDA readiness of the vLLM decode path), torch only (no vLLM on the GPU
# machine): the layer's replicated decode forward and the one-all-reduce path recorded in a
# CUDA graph through the torch.distributed backend (NCCL) at world 1, and at world 2 when
# two GPUs are present; replays equal eager bit for bit; no host sync under
# torch.cuda.set_sync_debug_mode('error'). About 1-2 minutes.
#   run(kind=nvidia-h200 (or nvidia-h200-x2), carry=[".whl"], command="bash scripts/gpu/capture.sh")
set -u
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_capture.py 2>&1 | tee "$OUT/capture.log" | tail -30
