"""TP2EP on several GPUs of one host (NCCL), against one GPU, in one torchrun job.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --nproc-per-node 2 -m spmd_moe.apps.bench.tp2ep --out tp2ep.json

Measures, with the Qwen3-30B-A3B layer (bf16):
- prefill, layout 'sequence' (each rank its own T tokens, all-to-all dispatch): forward and
  forward+backward time on n GPUs against the same per-GPU tokens on one GPU (EP=1,
  run on every GPU at once), so per-GPU throughput = t(1 GPU) / t(n GPUs);
- decode, layout 'replicated' (every rank the same T tokens, all-gather dispatch);
- NCCL in the same job: all_to_all_single with the layer's dispatch payload (per-rank
  outgoing bandwidth) and all_reduce bus bandwidth at the same sizes;
- a profile of the n-GPU prefill forward: where the time goes (NCCL, GEMMs, the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

import torch
import torch.distributed as dist

D, F_, E, K = 2048, 768, 128, 8


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[tp2ep] {msg}", file=sys.stderr, flush=True)


def timed(fn: Any, reps: int, warmup: int = 3) -> float:
    """Median ms on this rank; the slowest rank's median is what counts (max over ranks)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    dist.barrier()
    ts = []
    for i in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    med = torch.tensor([statistics.median(ts)], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def full_weights(dev: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g, device=dev) * 0.02).to(torch.bfloat16)

    return {
        "router.gate.weight": rnd(E, D),
        "routed_experts.inner_experts.w1_EFD": rnd(E, F_, D),
        "routed_experts.inner_experts.w2_EDF": rnd(E, D, F_),
        "routed_experts.inner_experts.w3_EFD": rnd(E, F_, D),
    }


def build(pctx: Any, layout: str, sd: dict[str, torch.Tensor], dev: torch.device) -> torch.nn.Module:
    import spmd_moe as sm
    from spmd_moe.checkpoint import shard_state_dict

    cfg = sm.MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, score_func="softmax",
                       route_norm=True, param_dtype=torch.bfloat16,
                       padding="pad")  # decode T is not always a multiple of the GPU count
    m = sm.MoE(cfg, pctx, layout=layout, device=dev)  # type: ignore[arg-type]
    shard = shard_state_dict(sd, cfg, pctx)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if k in shard:
                v.copy_(shard[k])
    return m


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--prefill", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--decode", type=int, nargs="*", default=[8, 64])
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    import spmd_moe as sm

    sd = full_weights(dev)
    ep = sm.ParallelContext.from_group(dist.group.WORLD, "tp")
    one = sm.ParallelContext.single()
    res: dict[str, Any] = {"gpus": n, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                           "nccl": ".".join(map(str, torch.cuda.nccl.version())), "prefill": [], "decode": [], "nccl_bw": []}
    log(f"{n} x {res['device']}, torch {torch.__version__}")

    m1_seq = build(one, "sequence", sd, dev)
    mn_seq = build(ep, "sequence", sd, dev)
    for T in args.prefill:
        xs = [torch.randn(T, D, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        g = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        reps = 10
        row: dict[str, Any] = {"T_per_gpu": T}
        with torch.no_grad():
            row["fwd_1gpu_ms"] = timed(lambda i: m1_seq(xs[i % 4]), reps)
            row["fwd_ngpu_ms"] = timed(lambda i: mn_seq(xs[i % 4]), reps)

        def fb(m: torch.nn.Module) -> Any:
            xg = [x.clone().requires_grad_(True) for x in xs]

            def step(i: int) -> None:
                for q in m.parameters():
                    q.grad = None
                m(xg[i % 4]).backward(g)
            return step

        row["fwdbwd_1gpu_ms"] = timed(fb(m1_seq), reps)
        row["fwdbwd_ngpu_ms"] = timed(fb(mn_seq), reps)
        row["per_gpu_throughput_fwd"] = row["fwd_1gpu_ms"] / row["fwd_ngpu_ms"]
        row["per_gpu_throughput_fwdbwd"] = row["fwdbwd_1gpu_ms"] / row["fwdbwd_ngpu_ms"]
        row["tokens_per_s_per_gpu_fwd_ngpu"] = T / (row["fwd_ngpu_ms"] * 1e-3)
        res["prefill"].append(row)
        log(json.dumps(row))

    m1_rep = build(one, "replicated", sd, dev)
    mn_rep = build(ep, "replicated", sd, dev)
    for T in args.decode:
        xs = [torch.randn(T, D, device=dev, dtype=torch.bfloat16) for _ in range(8)]
        for x in xs:
            dist.broadcast(x, 0)  # replicated: the same tokens on every rank
        with torch.no_grad():
            row = {"T": T, "fwd_1gpu_ms": timed(lambda i: m1_rep(xs[i % 8]), 30),
                   "fwd_ngpu_ms": timed(lambda i: mn_rep(xs[i % 8]), 30)}
        row["speedup"] = row["fwd_1gpu_ms"] / row["fwd_ngpu_ms"]
        res["decode"].append(row)
        log(json.dumps(row))

    # NCCL in the same job: the dispatch payload (T*K rows of D bf16 per rank).
    for T in args.prefill + [65536]:
        rows = T * K
        x = torch.randn(rows, D, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        ms = timed(lambda i: dist.all_to_all_single(y, x), 10)
        out_bytes = x.numel() * 2 * (n - 1) / n
        ar = torch.randn(rows, D, device=dev, dtype=torch.bfloat16)
        ms_ar = timed(lambda i: dist.all_reduce(ar), 10)
        busbw = ar.numel() * 2 * 2 * (n - 1) / n / (ms_ar * 1e-3)
        row = {"T_per_rank": T, "msg_MB": x.numel() * 2 / 1e6, "a2a_ms": ms, "a2a_out_GBps": out_bytes / (ms * 1e-3) / 1e9,
               "allreduce_ms": ms_ar, "allreduce_busbw_GBps": busbw / 1e9}
        row["a2a_over_allreduce_busbw"] = row["a2a_out_GBps"] / row["allreduce_busbw_GBps"]
        res["nccl_bw"].append(row)
        log(json.dumps(row))
        del x, y, ar

    # Where the n-GPU prefill forward spends its time.
    T = args.prefill[-1]
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            mn_seq(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                mn_seq(x)
            torch.cuda.synchronize()
    from spmd_moe.apps.bench.gpu_profile import kernel_split

    res["profile"] = kernel_split(prof, 5)
    log(json.dumps(res["profile"]))
    if rank == 0:
        text = json.dumps(res, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
