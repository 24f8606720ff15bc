"""Where the MoE layer's GPU time goes: kernels by kind (torch.profiler) and host syncs
(torch.cuda sync debug mode), for spmd_moe and torchtitan at a few token counts.

    python -m spmd_moe.apps.bench.gpu_profile --out profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import torch


def kind_of(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(s in low for s in ("grouped", "gemm", "cutlass", "sm90", "gemv", "cublas", "xmma", "wgmma")):
        return "gemm"
    if "sort" in low or "radix" in low:
        return "sort"
    if any(s in low for s in ("index", "gather", "scatter")):
        return "index/scatter"
    if "memcpy" in low or "memset" in low:
        return "memcpy/memset"
    if "reduce" in low or "topk" in low or "softmax" in low:
        return "reduce/topk/softmax"
    return "elementwise/other"


def kernel_split(prof: Any, iters: int) -> dict[str, Any]:
    """Device time per call, by kind of kernel, plus the top kernels and the kernel count."""
    from torch.autograd import DeviceType

    buckets: dict[str, float] = {}
    by_name: dict[str, float] = {}
    count = 0
    for ev in prof.events():
        if ev.device_type != DeviceType.CUDA or ev.name.startswith("nccl:"):
            continue  # "nccl:..." is the annotation around the NCCL kernel, not a kernel
        ms = ev.time_range.elapsed_us() / 1e3 / iters
        count += 1
        k = kind_of(ev.name)
        buckets[k] = buckets.get(k, 0.0) + ms
        by_name[ev.name[:100]] = by_name.get(ev.name[:100], 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"device_ms_per_call": round(sum(buckets.values()), 4),
            "kernels_per_call": count / iters,
            "ms_per_call_by_kind": {k: round(v, 4) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[k, round(v, 4)] for k, v in top]}


def host_syncs(fn: Any) -> int:
    """Number of synchronizing CUDA calls made by fn() (sync debug mode warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (not the one-time "sync debug mode is a prototype" notice)
    return sum(1 for x in w if "called a synchronizing" in str(x.message))


def main() -> int:
    from torch.profiler import ProfilerActivity, profile

    from spmd_moe.apps.bench import moe_bench as mb

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 64, 4096, 32768])
    args = p.parse_args()
    dev = torch.device("cuda")
    sh = mb.shapes_for(True, dev)
    spmd = mb.build_spmd(sh, dev)
    titan = mb.build_titan(sh, dev)
    mb.share_weights(spmd, titan, sh, dev)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": []}
    for T in args.tokens:
        x = torch.randn(T, sh.dim, device=dev, dtype=torch.bfloat16)
        row: dict[str, Any] = {"T": T}
        for name, fn in (("spmd", lambda: spmd(x)), ("titan", lambda: titan(x.unsqueeze(0)))):
            with torch.no_grad():
                for _ in range(3):
                    fn()
                row[f"{name}_host_syncs_fwd"] = host_syncs(fn)
                torch.cuda.synchronize()
                iters = 5
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(iters):
                        fn()
                    torch.cuda.synchronize()
            row[f"{name}_fwd"] = kernel_split(prof, iters)
        xg = x.clone().requires_grad_(True)
        row["spmd_host_syncs_fwdbwd"] = host_syncs(lambda: spmd(xg).sum().backward())
        if T >= 4096:  # where forward+backward spends its time
            gy = torch.randn_like(x)
            for name, fb in (("spmd", lambda: spmd(xg).backward(gy)), ("titan", lambda: titan(xg.unsqueeze(0)).backward(gy.unsqueeze(0)))):
                fb()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fb()
                    torch.cuda.synchronize()
                row[f"{name}_fwdbwd"] = kernel_split(prof, 3)
        res["rows"].append(row)
        print(f"[profile] T={T} " + json.dumps(row), file=sys.stderr, flush=True)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
