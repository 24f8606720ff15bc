"""Issue 13 (session 5, H2): the EP fwd+bwd path's padded rows on 2 GPUs, new vs the old
padding (F.pad copy, zeroed GEMM tails, slice of the outputs, cat of the one returned
piece), emulated in the same process by patching spmd_moe.dispatch.all_to_all back.

Checks every value bitwise (forward, input gradient, router and expert weight
gradients: the CUDA grouped GEMMs leave the pad rows undefined now, so this is where a
read of them would show) and times fwd+bwd of both (median of 10, wall time between device syncs, max
over ranks). Qwen3-30B-A3B layer: D=2048, F=768, E=128, top-8, bf16, layout 'sequence',
dispatcher all_to_all, chunks 1, kernels 'fast' and 'torchtitan'.

    torchrun --nproc-per-node 2 scripts/gpu/ep_pad_check.py --out $OUT/ep_pad_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import spmd_moe as sm
import spmd_moe.dispatch.all_to_all as a2a
from spmd_moe.checkpoint import shard_state_dict

D, F_, E, K = 2048, 768, 128, 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo, small layer: checks this script only")
    args = ap.parse_args()
    global D, F_, E, K
    if args.smoke:
        D, F_, E, K = 64, 32, 16, 4
        a2a.PAD_ROWS_ON_CPU = True
    dist.init_process_group("gloo" if args.smoke else "nccl")
    rank = dist.get_rank()
    dev = torch.device("cpu") if args.smoke else torch.device("cuda", rank)
    if not args.smoke:
        torch.cuda.set_device(dev)
    sync = (lambda: None) if args.smoke else torch.cuda.synchronize
    g = torch.Generator(device=dev).manual_seed(0)
    sd = {k: (torch.randn(*s, generator=g, device=dev) * 0.02).bfloat16() for k, s in (
        ("router.gate.weight", (E, D)), ("routed_experts.inner_experts.w1_EFD", (E, F_, D)),
        ("routed_experts.inner_experts.w2_EDF", (E, D, F_)), ("routed_experts.inner_experts.w3_EFD", (E, F_, D)))}
    pctx = sm.ParallelContext.from_group(dist.group.WORLD, "tp")
    real = (a2a._GatherPadded, a2a._cat)
    last_R = [-1]  # rows of the last padded gather (-1: none since the last experts call)

    class OldPad:
        @staticmethod
        def apply(x: torch.Tensor, idx: torch.Tensor, pad: int) -> torch.Tensor:
            last_R[0] = idx.shape[0]
            return F.pad(x[idx], (0, 0, 0, pad))

    res: dict[str, Any] = {"cases": []}
    for kernels in ("fast", "torchtitan"):
        cfg = sm.MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, score_func="softmax", route_norm=True,
                           param_dtype=torch.bfloat16, dispatcher="all_to_all", kernels=kernels)
        m = sm.MoE(cfg, pctx, layout="sequence", device=dev)
        m.load_state_dict(shard_state_dict(sd, cfg, pctx))
        ex = m.experts
        new_fwd = ex.forward

        def old_fwd(r: Any, c: Any, rows_exact: bool = False) -> Any:
            out = new_fwd(r, c, False)  # zeroed tails, as before
            R, last_R[0] = last_R[0], -1
            return out[:R] if R >= 0 else out  # the old slice of the outputs

        def mode(old: bool) -> None:
            a2a._GatherPadded = OldPad if old else real[0]  # type: ignore[misc]
            a2a._cat = (lambda ts: torch.cat(ts)) if old else real[1]
            ex.forward = old_fwd if old else new_fwd  # type: ignore[method-assign]

        for T in args.T:
            gen = torch.Generator(device=dev).manual_seed(1000 + rank)
            x = torch.randn(T, D, device=dev, generator=gen).bfloat16()
            gy = torch.randn(T, D, device=dev, generator=gen).bfloat16()
            vals, ms = [], []
            for old in (False, True):
                mode(old)
                def step() -> tuple[torch.Tensor, torch.Tensor]:
                    m.zero_grad(set_to_none=True)
                    xi = x.clone().requires_grad_(True)
                    y = m(xi)
                    y.backward(gy)
                    assert xi.grad is not None
                    return y, xi.grad
                for _ in range(3):
                    step()
                sync()
                y, gx = step()
                vals.append((y.detach().clone(), gx.clone(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
                ts = []
                for _ in range(10):
                    sync()
                    t0 = time.perf_counter()
                    step()
                    sync()
                    ts.append((time.perf_counter() - t0) * 1e3)
                t = torch.tensor([statistics.median(ts)], device=dev)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                ms.append(float(t))
            mode(False)
            (y0, g0, w0), (y1, g1, w1) = vals
            ok = {"fwd": bool(torch.equal(y0, y1)), "grad_x": bool(torch.equal(g0, g1)),
                  **{k.split(".")[-1]: bool(torch.equal(w0[k], w1[k])) for k in w0},
                  "finite": bool(torch.isfinite(g0).all()) and all(bool(torch.isfinite(v).all()) for v in w0.values())}
            flags = torch.tensor([int(all(ok.values()))], device=dev)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            case = {"kernels": kernels, "T_per_gpu": T, "bitwise_all_ranks": bool(flags.item()), "rank0": ok,
                    "fwdbwd_ms_new": round(ms[0], 3), "fwdbwd_ms_old": round(ms[1], 3), "saved_ms": round(ms[1] - ms[0], 3)}
            res["cases"].append(case)
            if rank == 0:
                print(json.dumps(case), flush=True)
        del m
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
