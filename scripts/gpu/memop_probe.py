"""Probe (issue 13, session 8): an exchange with no SM in it. Each rank pushes its segment
for every peer into that peer's symmetric-memory buffer with a device-to-device copy (a copy
engine) and signals it with a stream memory operation (cuStreamWriteValue32 through
torch.ops.symm_mem.stream_write_value32_); the receiver's stream waits on the flag with
cuStreamWaitValue32 (ctypes, libcuda). No kernel frames the transfer, so nothing in it
waits for SMs held by a GEMM.

    torchrun --nproc-per-node 2 scripts/gpu/memop_probe.py OUT.json

Checks the bytes against NCCL's all_to_all_single, times it alone and under a ~3 ms
cuBLAS GEMM (comm issued first on a side stream), NCCL the same way with a high-priority
side stream, and whether the flagged exchange can be captured in a CUDA graph and replayed
with new data. Every step is recorded; a failure is written down, not raised.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm

from ce_probe import finish, record_error  # scripts/gpu/ (the script's own folder)
from spmd_moe.apps.bench.symm_probe import _time as timeit  # slowest rank's median ms

_EQ = 0x1


def main() -> None:
    dist.init_process_group("nccl")
    r, n = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", r)
    torch.cuda.set_device(dev)
    res: dict[str, Any] = {"n": n, "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    T, D = 16384, 2048
    lib = ctypes.CDLL("libcuda.so.1")
    wait_fn = lib.cuStreamWaitValue32_v2
    wait_fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    wait_fn.restype = ctypes.c_int

    def wait_eq(flags: torch.Tensor, idx: int, val: int) -> None:
        rc = wait_fn(torch.cuda.current_stream().cuda_stream, flags.data_ptr() + 4 * idx, val, _EQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32_v2 returned {rc}")

    write = torch.ops.symm_mem.stream_write_value32_

    A = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    B = torch.randn(D, 3 * D, device=dev, dtype=torch.bfloat16)

    def gemm() -> None:
        for _ in range(6):
            A @ B

    side = torch.cuda.Stream(dev, priority=-1)
    res["gemm_ms"] = timeit(gemm)
    try:
        send = torch.randn(n * T, D, device=dev).to(torch.bfloat16)
        buf = symm.empty(n * T, D, dtype=torch.bfloat16, device=dev)
        hdl = symm.rendezvous(buf, dist.group.WORLD.group_name)
        fl = symm.empty(2 * n, dtype=torch.uint32, device=dev)  # ready[0:n], free[n:2n]
        fhdl = symm.rendezvous(fl, dist.group.WORLD.group_name)
        fl.zero_()
        fl[n:].fill_(1)  # every peer may write into my buffer
        torch.cuda.synchronize()
        dist.barrier()
        peer_buf = {j: hdl.get_buffer(j, (n * T, D), torch.bfloat16) for j in range(n) if j != r}
        peer_fl = {j: fhdl.get_buffer(j, (2 * n,), torch.uint32) for j in range(n) if j != r}
        out = torch.empty_like(send)

        def push() -> None:  # on the current (side) stream: copies and flags only
            for j in peer_buf:
                wait_eq(fl, n + j, 1)  # peer j has read my last segment
                write(fl, n + j, 0)
                peer_buf[j][r * T:(r + 1) * T].copy_(send[j * T:(j + 1) * T], non_blocking=True)
                write(peer_fl[j], r, 1)  # fenced after the copy

        def consume() -> None:  # on the current (main) stream
            buf[r * T:(r + 1) * T].copy_(send[r * T:(r + 1) * T])
            for j in peer_buf:
                wait_eq(fl, j, 1)
                write(fl, j, 0)
            out.copy_(buf)
            for j in peer_buf:
                write(peer_fl[j], n + r, 1)

        def ce() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                push()
            consume()
            torch.cuda.current_stream().wait_stream(side)

        def ce_under() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                push()
            gemm()
            consume()
            torch.cuda.current_stream().wait_stream(side)

        ref = torch.empty_like(send)
        dist.all_to_all_single(ref, send)
        ce()
        torch.cuda.synchronize()
        res["memop_equals_nccl"] = bool(torch.equal(out, ref))
        res["memop_ms"] = timeit(ce)
        res["memop_under_gemm_ms"] = timeit(ce_under)
        res["local_copy_ms"] = timeit(lambda: out.copy_(buf))
        if len(sys.argv) > 2:  # a trace of each rank's exchange under the GEMM (rank r: ARG2.rR.json)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    ce_under()
                torch.cuda.synchronize()
            prof.export_chrome_trace(f"{sys.argv[2]}.r{r}.json")

        def nccl_under() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                dist.all_to_all_single(ref, send)
            gemm()
            torch.cuda.current_stream().wait_stream(side)

        res["nccl_ms"] = timeit(lambda: dist.all_to_all_single(ref, send))
        res["nccl_hiprio_under_gemm_ms"] = timeit(nccl_under)
        # CUDA graph: the flagged exchange captured once, replayed with new send data.
        try:
            g = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            dist.barrier()
            with torch.cuda.graph(g):
                ce()
            ok = []
            for it in range(3):
                send.copy_(torch.randn(n * T, D, device=dev).to(torch.bfloat16))
                torch.cuda.synchronize()
                dist.barrier()
                g.replay()
                torch.cuda.synchronize()
                dist.all_to_all_single(ref, send)
                torch.cuda.synchronize()
                ok.append(bool(torch.equal(out, ref)))
            res["graph_replays_equal_nccl"] = ok
            res["graph_ms"] = timeit(g.replay)
        except Exception as e:
            record_error(res, "graph", e)
    except Exception as e:
        record_error(res, "memop", e)
    finish(res, r, sys.argv[1])


if __name__ == "__main__":
    main()
