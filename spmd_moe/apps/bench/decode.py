"""Decode on one GPU: the fused kernels (MoEConfig.kernels='fast') against the torch
path ('torchtitan' kernels) and the HBM floor, CUDA graphs, side by side in one run.

    python -m spmd_moe.apps.bench.decode --out decode.json [--sweep]

Layer: Qwen3-30B-A3B's MoE (D=2048, F=768, E=128, top-8, bf16). Floor: the bytes of the
experts the batch touches (3*D*F*2 B each) plus the gate, at the card's nominal HBM
bandwidth (4.8 TB/s on an H200). Kernels per forward and their device time come from
torch.profiler over one eager forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from spmd_moe.apps.bench.moe_bench import nominal_hbm_bps, timer, try_graph
from spmd_moe.config import KernelChoice

D, F, E, K = 2048, 768, 128, 8


def _layer(kernels: KernelChoice, device: torch.device) -> Any:
    import spmd_moe as sm

    cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func="softmax", route_norm=True,
                       param_dtype=torch.bfloat16, kernels=kernels)
    m = sm.MoE(cfg, device=device)
    m.init_states(seed=0)
    return m


def _kernels_of(model: Any, x: torch.Tensor) -> tuple[int, float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, float] = {}
    for e in evs:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time / 1e3
    return len(evs), sum(e.device_time for e in evs) / 1e3, by_name  # ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    from spmd_moe.kernels import decode as dk

    device = torch.device("cuda")
    fast, ref = _layer("fast", device), _layer("torchtitan", device)
    ref.load_state_dict(fast.state_dict())
    bps = nominal_hbm_bps(torch.cuda.get_device_name(device))
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "hbm_Bps": bps, "rows": [],
                           "tiles": dict(dk.TILES), "tiles_large_t": dict(dk.TILES_LARGE_T)}
    g = torch.Generator(device=device).manual_seed(1)
    for T in args.tokens:
        xs = [torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(8)]
        with torch.no_grad():
            fast.tokens_per_expert_E.zero_()
            y_f, y_r = fast(xs[0]), ref(xs[0])
            touched = int((fast.tokens_per_expert_E > 0).sum())
        floor_ms = (touched * 3 * D * F * 2 + E * D * 2) / bps * 1e3
        row: dict[str, Any] = {"T": T, "touched_experts": touched, "floor_ms": floor_ms,
                               "max_abs_diff_vs_torch": float((y_f.float() - y_r.float()).abs().max()),
                               "max_abs_out": float(y_r.float().abs().max())}
        for name, m in (("fast", fast), ("torch", ref)):
            rep = try_graph(device, m, xs)
            if rep is not None:
                row[f"{name}_graph_ms"] = timer(device, rep, args.reps, warmup=10)
            n, ms, by_name = _kernels_of(m, xs[0])
            row[f"{name}_kernels"], row[f"{name}_kernel_ms"] = n, ms
            if name == "fast":
                row["fast_by_kernel_ms"] = by_name
        if "fast_graph_ms" in row:
            row["fast_over_floor"] = row["fast_graph_ms"] / floor_ms
        if "torch_graph_ms" in row:
            row["torch_over_floor"] = row["torch_graph_ms"] / floor_ms
        print(json.dumps(row), file=sys.stderr, flush=True)
        res["rows"].append(row)
    if args.sweep:
        res["sweep"] = sweep(fast, device, args)
    return res


def sweep(fast: Any, device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Graph time per tile choice at T=1, 8, 64 (pick TILES from this)."""
    from spmd_moe.kernels import decode as dk

    base, base_large = dict(dk.TILES), dict(dk.TILES_LARGE_T)
    out = []
    g = torch.Generator(device=device).manual_seed(2)
    choices = [dict(base, up_f=f, up_d=d, down_n=n, down_f=d, stages=st)
               for f in (32, 64) for n in (32, 64) for d in (64, 128, 256) for st in (3, 4)]
    for ch in choices:
        dk.TILES.update(ch)
        dk.TILES_LARGE_T.update(ch)
        row: dict[str, Any] = {"tiles": ch}
        for T in (1, 8, 64):
            xs = [torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4)]
            rep = try_graph(device, fast, xs)
            row[f"T{T}_ms"] = timer(device, rep, 100, warmup=5) if rep else None
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
    dk.TILES.update(base)
    dk.TILES_LARGE_T.update(base_large)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spmd_moe.apps.bench.decode")
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "needs CUDA"}))
        return 0
    res = run(args)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
