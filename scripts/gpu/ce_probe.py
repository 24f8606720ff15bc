"""Probe (issue 13): can the fixed-size exchange move its rows with the GPUs' copy engines
(torch symmetric memory: each rank pulls its segment from every peer's buffer with a
device-to-device copy) instead of NCCL's kernels, and does that transfer overlap a GEMM
running on the SMs where NCCL's does not?

    torchrun --nproc-per-node 2 scripts/gpu/ce_probe.py OUT.json

Times (slowest rank's median, ms) for the layer's payloads at T=16384 per GPU (bf16 tokens
[n*T, D], fp32 partial sums [n*T, D]): NCCL all_to_all_single; the copy-engine pull (barrier,
n copies, barrier); a ~3 ms bf16 GEMM alone; and each transfer on a side stream under that
GEMM. Every step is recorded; a failure is written down, not raised.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist

from spmd_moe.apps.bench.symm_probe import _time as timeit  # slowest rank's median ms


def record_error(res: dict[str, Any], key: str, e: Exception) -> None:
    """A failed step, written down (the probes never raise)."""
    res[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    res[f"{key}_tb"] = traceback.format_exc()[-1500:]


def finish(res: dict[str, Any], rank: int, path: str) -> None:
    """Rank 0 prints and writes the result; every rank leaves the group."""
    if rank == 0:
        print(json.dumps(res, indent=1), flush=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    dist.init_process_group("nccl")
    r, n = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", r)
    torch.cuda.set_device(dev)
    res: dict[str, Any] = {"n": n, "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    T, D = 16384, 2048

    A = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    B = torch.randn(D, 3 * D, device=dev, dtype=torch.bfloat16)

    def gemm() -> None:
        for _ in range(6):
            A @ B

    side = torch.cuda.Stream(dev)

    def under_gemm(comm: Any) -> Any:
        def both() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                comm()
            gemm()
            torch.cuda.current_stream().wait_stream(side)
        return both

    res["gemm_ms"] = timeit(gemm)
    for dt in (torch.bfloat16, torch.float32):
        tag = str(dt).split(".")[-1]
        send = torch.randn(n * T, D, device=dev).to(dt)
        recv_nccl = torch.empty_like(send)
        try:
            res[f"nccl_{tag}_ms"] = timeit(lambda: dist.all_to_all_single(recv_nccl, send))
            res[f"nccl_{tag}_under_gemm_ms"] = timeit(under_gemm(lambda: dist.all_to_all_single(recv_nccl, send)))
        except Exception as e:
            res[f"nccl_{tag}_error"] = f"{type(e).__name__}: {e}"
        try:
            import torch.distributed._symmetric_memory as symm

            buf = symm.empty(n * T, D, dtype=dt, device=dev)
            hdl = symm.rendezvous(buf, dist.group.WORLD.group_name)
            res["symm_backend"] = str(getattr(symm, "get_backend", lambda d: "?")(dev))
            peers = [hdl.get_buffer(j, (n * T, D), dt) for j in range(n)]
            recv = torch.empty_like(send)
            buf.copy_(send)  # the producer writes its send rows here (the real path would too)

            def ce() -> None:
                hdl.barrier(channel=0)  # every peer's rows are in place
                for j in range(n):  # pull my segment of each peer (a device-to-device copy)
                    recv[j * T:(j + 1) * T].copy_(peers[j][r * T:(r + 1) * T])
                hdl.barrier(channel=0)  # nobody reads my buffer any more: it may be rewritten

            ce()
            torch.cuda.synchronize()
            dist.all_to_all_single(recv_nccl, send)
            res[f"ce_{tag}_equals_nccl"] = bool(torch.equal(recv, recv_nccl))
            res[f"ce_{tag}_ms"] = timeit(ce)
            res[f"ce_{tag}_under_gemm_ms"] = timeit(under_gemm(ce))
            res[f"ce_{tag}_write_own_buffer_ms"] = timeit(lambda: buf.copy_(send))
        except Exception as e:
            record_error(res, f"ce_{tag}", e)
    finish(res, r, sys.argv[1])


if __name__ == "__main__":
    main()
