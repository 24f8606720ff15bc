"""Probe: does torch's NVSHMEM all-to-all-v with device-side split sizes
(torch.ops.symm_mem.all_to_all_vdev) run on this machine with NVLink multicast off, and
how fast is it next to NCCL's all_to_all_single on the layer's dispatch payload?

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --nproc-per-node 2 -m spmd_moe.apps.bench.symm_probe --out symm_probe.json

It is the transport a dropless all-to-all without a host read would need (the split sizes
stay on the GPU). Every step is reported; any failure is recorded, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist


def _time(fn: Any, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    med = torch.tensor([statistics.median(ts)], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.empty(1, device=dev)
    res: dict[str, Any] = {"gpus": n, "torch": torch.__version__, "steps": [],
                           "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}}

    def step(name: str, fn: Any) -> Any:
        try:
            v = fn()
            res["steps"].append({"step": name, "ok": True, "value": v})
            return v
        except Exception as e:  # noqa: BLE001 - the probe reports
            res["steps"].append({"step": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}",
                                 "tb": traceback.format_exc()[-800:]})
            return None

    import torch.distributed._symmetric_memory as symm_mem

    D, K = 2048, 8
    rows = args.tokens * K // n  # rows to each destination (uniform routing)
    per = rows * D
    step("is_nvshmem_available", lambda: bool(symm_mem.is_nvshmem_available()))
    step("set_backend", lambda: symm_mem.set_backend("NVSHMEM"))
    group_name = dist.group.WORLD.group_name
    step("enable_symm_mem_for_group", lambda: symm_mem.enable_symm_mem_for_group(group_name))
    bufs = step("alloc", lambda: {
        "inp": symm_mem.empty(per * n, dtype=torch.bfloat16, device=dev),
        "out": symm_mem.empty(per * n * 2, dtype=torch.bfloat16, device=dev),  # room past the uniform case
        "in_splits": symm_mem.empty(n, dtype=torch.int64, device=dev),
        "out_so": symm_mem.empty((2, n), dtype=torch.int64, device=dev),
        "in_out": symm_mem.empty((3, n), dtype=torch.int64, device=dev),
    })
    if bufs is not None:
        for k in ("inp", "out", "in_splits", "out_so", "in_out"):
            step(f"rendezvous_{k}", lambda k=k: (symm_mem.rendezvous(bufs[k], group_name), None)[1])
        inp = bufs["inp"]
        inp.copy_(torch.randn(per * n, device=dev).to(torch.bfloat16))
        bufs["in_splits"].fill_(per)
        bufs["in_out"][0].fill_(per)
        ref = torch.empty(per * n, dtype=torch.bfloat16, device=dev)
        dist.all_to_all_single(ref, inp.clone())
        torch.cuda.synchronize()

        def call5() -> None:
            torch.ops.symm_mem.all_to_all_vdev(inp, bufs["out"], bufs["in_splits"], bufs["out_so"], group_name)

        def call4() -> None:
            torch.ops.symm_mem.all_to_all_vdev(inp, bufs["out"], bufs["in_out"], group_name)

        def ran(fn: Any) -> bool:
            fn()
            torch.cuda.synchronize()
            return True

        call = None
        for name, fn in (("vdev_5arg", call5), ("vdev_4arg", call4)):
            if step(f"{name}_run", lambda fn=fn: ran(fn)):
                call = fn
                res["signature"] = name
                break
        if call is not None:
            step("matches_nccl", lambda: bool(torch.equal(bufs["out"][: per * n], ref)))
            step("vdev_ms", lambda: _time(call))
            x = inp.clone()
            y = torch.empty_like(x)
            step("nccl_a2a_ms", lambda: _time(lambda: dist.all_to_all_single(y, x)))

            def sync_free() -> str:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    call()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                return "no host sync"

            step("sync_debug_error_mode", sync_free)

            def graph() -> bool:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    call()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    call()
                g.replay()
                torch.cuda.synchronize()
                return bool(torch.equal(bufs["out"][: per * n], ref))

            step("cuda_graph_capture_replay_matches", graph)
    res["payload_MB_per_rank"] = per * n * 2 / 1e6
    if rank == 0:
        text = json.dumps(res, indent=1, default=str)  # a step may return a tensor (s4 run 1 crashed here)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
