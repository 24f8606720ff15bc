"""Decode on one GPU: the fused kernels (MoEConfig.kernels='fast') against the torch
path ('torchtitan' kernels) and the HBM floor, CUDA graphs, side by side in one run.

    python -m spmd_moe.apps.bench.decode --out decode.json [--sweep]
        [--variants tiled split split_fused split_fused_pdl] [--split-max-t 8] [--split-sweep] [--budget-s 90]

Variants (spmd_moe.kernels.decode.SPLIT): 'tiled' (the kernels of session 3 at every T)
and, for T <= --split-max-t, 'split' / 'split_fused' (weights streamed split-K by more,
smaller programs; fused: the combine inside the down kernel); a '_pdl' suffix launches
them with programmatic dependent launch (LAUNCH['pdl']); 'tiled_pdl' likewise. Each is timed on the same
layer, weights and inputs, with its own CUDA graph.

Layer: Qwen3-30B-A3B's MoE (D=2048, F=768, E=128, top-8, bf16). Floor: the bytes of the
experts the batch touches (3*D*F*2 B each) plus the gate, at the card's nominal HBM
bandwidth (4.8 TB/s on an H200). Kernels per forward and their device time come from
torch.profiler over one eager forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from spmd_moe.apps.bench.moe_bench import nominal_hbm_bps, timer, try_graph
from spmd_moe.config import KernelChoice

D, F, E, K = 2048, 768, 128, 8


def _layer(kernels: KernelChoice, device: torch.device, init: bool = True) -> Any:
    import spmd_moe as sm

    # CPU dry run (--small, Triton's interpreter): the kernels take fp32 tensors holding bf16 values.
    dt = torch.float32 if device.type == "cpu" and kernels == "fast" else torch.bfloat16
    cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func="softmax", route_norm=True,
                       param_dtype=dt, kernels=kernels)
    m = sm.MoE(cfg, device=device)
    if init:  # (seeded on the host expert by expert: seconds per layer; copies are cheap)
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

    t_start = time.monotonic()
    device = torch.device("cuda")
    fast, ref = _layer("fast", device), _layer("torchtitan", device)
    ref.load_state_dict(fast.state_dict())
    bps = nominal_hbm_bps(torch.cuda.get_device_name(device))
    dk.SPLIT["max_t"] = args.split_max_t
    dk.SLOT["on"] = False  # this mode times the session-3..5 variants; --alternate has the slot design
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "hbm_Bps": bps, "rows": [],
                           "tiles": dict(dk.TILES), "tiles_large_t": dict(dk.TILES_LARGE_T),
                           "split": dict(dk.SPLIT), "split_tiles": dict(dk.SPLIT_TILES), "launch": dict(dk.LAUNCH)}
    default_variant = dk.SPLIT["variant"]
    g = torch.Generator(device=device).manual_seed(1)
    inputs: dict[int, tuple[list[torch.Tensor], torch.Tensor, float]] = {}
    for T in args.tokens:  # the torch path first: the reference outputs and its timings
        xs = [torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(8)]
        with torch.no_grad():
            ref.tokens_per_expert_E.zero_()
            y_r = ref(xs[0])
            touched = int((ref.tokens_per_expert_E > 0).sum())
        floor_ms = (touched * 3 * D * F * 2 + E * D * 2) / bps * 1e3
        inputs[T] = (xs, y_r, floor_ms)
        row: dict[str, Any] = {"T": T, "touched_experts": touched, "floor_ms": floor_ms,
                               "max_abs_out": float(y_r.float().abs().max())}
        rep = try_graph(device, ref, xs) if args.torch_graph else None
        if rep is not None:
            row["torch_graph_ms"] = timer(device, rep, args.reps, warmup=10)
            row["torch_over_floor"] = row["torch_graph_ms"] / floor_ms
        if args.torch_profile:
            row["torch_kernels"], row["torch_kernel_ms"], _ = _kernels_of(ref, xs[0])
        res["rows"].append(row)
    # Variant by variant, the tiled one first (a fault in a newer variant cannot lose its rows).
    y_tiled: dict[int, torch.Tensor] = {}
    for v in args.variants:
        for T, row in zip(args.tokens, res["rows"]):
            if v != "tiled" and T > args.split_max_t:
                continue
            xs, y_r, floor_ms = inputs[T]
            dk.SPLIT["variant"] = v.removesuffix("_pdl")
            dk.LAUNCH["pdl"] = v.endswith("_pdl")
            pre = "fast" if v == "tiled" else v  # 'fast_*' keys: the tiled kernels, as in earlier JSON
            try:
                with torch.no_grad():
                    y_f = fast(xs[0])
                if v == "tiled":
                    y_tiled[T] = y_f
                row[f"{pre}_max_abs_diff_vs_torch"] = float((y_f.float() - y_r.float()).abs().max())
                if T in y_tiled and v != "tiled":
                    row[f"{pre}_max_abs_diff_vs_tiled"] = float((y_f.float() - y_tiled[T].float()).abs().max())
                rep = try_graph(device, fast, xs)
                if rep is not None:
                    row[f"{pre}_graph_ms"] = timer(device, rep, args.reps, warmup=10)
                    row[f"{pre}_over_floor"] = row[f"{pre}_graph_ms"] / floor_ms
                n, ms, by_name = _kernels_of(fast, xs[0])
                row[f"{pre}_kernels"], row[f"{pre}_kernel_ms"], row[f"{pre}_by_kernel_ms"] = n, ms, by_name
            except Exception as e:  # one variant failing (build, launch) leaves the others' numbers
                row[f"{pre}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            dk.SPLIT["variant"] = default_variant
            dk.LAUNCH["pdl"] = res["launch"]["pdl"]
            print(json.dumps({"T": T, "variant": v, **{k: x for k, x in row.items() if k.startswith(pre)}}),
                  file=sys.stderr, flush=True)
            _write(args.out, res)  # so far: a run cut short by its timeout still leaves the rows
    if args.tiled_sweep:
        res["tiled_sweep"] = tiled_sweep(fast, device, args, t_start, res)
    if args.split_sweep:
        res["split_sweep"] = split_sweep(fast, device, args, t_start, res)
    if args.sweep:
        res["sweep"] = sweep(fast, device, args)
    res["wall_s"] = time.monotonic() - t_start
    return res


ALT_VARIANTS = ["tiled", "tiled_pdl", "slot", "slot_pdl", "tiled_s4_pdl", "slot_s4_pdl"]


def _configure(v: str) -> None:
    """Set spmd_moe.kernels.decode's switches for variant v: 'tiled' (the five kernels at
    every T), 'split', 'split_fused', 'slot' (the slot design up to MAX_T tokens), each
    optionally '_s4' (4 pipeline stages) and '_pdl' (programmatic dependent launch)."""
    from spmd_moe.kernels import decode as dk

    base = v.removesuffix("_pdl")
    stages4 = base.endswith("_s4")
    base = base.removesuffix("_s4")
    dk.SPLIT["variant"] = base if base in ("split", "split_fused") else "tiled"
    dk.SLOT["on"] = base == "slot"
    dk.SLOT["max_t"] = dk.MAX_T
    dk.LAUNCH["pdl"] = v.endswith("_pdl")
    if stages4:
        dk.SLOT_TILES["stages"] = 4
        dk.TILES["stages"] = 4


def _switches() -> tuple[dict[str, Any], ...]:
    from spmd_moe.kernels import decode as dk

    return dict(dk.SPLIT), dict(dk.SLOT), dict(dk.LAUNCH), dict(dk.SLOT_TILES), dict(dk.TILES)


def _restore(saved: tuple[dict[str, Any], ...]) -> None:
    from spmd_moe.kernels import decode as dk

    for d, old in zip((dk.SPLIT, dk.SLOT, dk.LAUNCH, dk.SLOT_TILES, dk.TILES), saved):
        d.clear()
        d.update(old)


def run_alternating(args: argparse.Namespace) -> dict[str, Any]:
    """Per T: every variant's CUDA graph captured once, then timed in turn, round after
    round (A B C A B C ...), so that drift and noise fall on all variants alike; the
    figure is the median of the rounds' medians (all rounds kept). Outputs checked against
    the torch path (eager) and the tiled variant; kernels and device time per variant."""
    from spmd_moe.kernels import decode as dk

    t_start = time.monotonic()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fast, ref = _layer("fast", device), _layer("torchtitan", device, init=False)
    ref.load_state_dict(fast.state_dict())
    name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter, dry run)"
    bps = nominal_hbm_bps(name) if cuda else 4.8e12
    saved = _switches()
    res: dict[str, Any] = {"device": name, "hbm_Bps": bps, "mode": "alternating", "shape": [D, F, E, K],
                           "rounds": args.rounds, "reps": args.reps, "tiles": dict(dk.TILES),
                           "tiles_large_t": dict(dk.TILES_LARGE_T), "slot_tiles": dict(dk.SLOT_TILES),
                           "defaults": {"split": saved[0], "slot": saved[1], "launch": saved[2]},
                           "rows": []}
    g = torch.Generator(device=device).manual_seed(1)
    # --stack N: N distinct layers (own copies of the weights: other addresses, so no L2 reuse between
    # calls) on N inputs in ONE graph, as in a model's decode step; per-layer time = replay / N: no
    # per-replay graph launch or input copy.
    stack = [fast]
    for _ in range(args.stack - 1 if cuda else 0):
        stack.append(_layer("fast", device, init=False))
        stack[-1].load_state_dict(fast.state_dict())
    res["stack"] = len(stack) if len(stack) > 1 else 0
    for T in args.tokens:
        xs = [torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(8)]
        if not cuda:
            xs = [x.float() for x in xs]
        with torch.no_grad():
            ref.tokens_per_expert_E.zero_()
            y_r = ref(xs[0].to(torch.bfloat16))
            touched = int((ref.tokens_per_expert_E > 0).sum())
            tpe_r = ref.tokens_per_expert_E.clone()
        floor_ms = (touched * 3 * D * F * 2 + E * D * 2) / bps * 1e3
        row: dict[str, Any] = {"T": T, "touched_experts": touched, "floor_ms": floor_ms,
                               "max_abs_out": float(y_r.float().abs().max())}
        reps: dict[str, Any] = {}
        stack_reps: dict[str, Any] = {}
        if len(stack) > 1:
            xs_s = [xs[0]] + [torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16)
                              for _ in range(len(stack) - 1)]
            row["stack_floor_ms"] = _stack_floor_ms(stack, xs_s, bps)
        res["rows"].append(row)  # filled in as it goes; the JSON is rewritten after each step
        y_first: torch.Tensor | None = None
        for v in args.alt_variants:
            if v.startswith("slot") and T > args.slot_max_t:
                continue
            try:
                _configure(v)
                with torch.no_grad():
                    fast.tokens_per_expert_E.zero_()
                    y_f = fast(xs[0])
                    row[f"{v}_routing_equal"] = bool(torch.equal(fast.tokens_per_expert_E, tpe_r))
                row[f"{v}_max_abs_diff_vs_torch"] = float((y_f.float() - y_r.float()).abs().max())
                if y_first is None:
                    y_first = y_f
                row[f"{v}_max_abs_diff_vs_{args.alt_variants[0]}"] = float((y_f.float() - y_first.float()).abs().max())
                rep = try_graph(device, fast, xs) if cuda else _eager(fast, xs, v)
                if rep is not None:
                    reps[v] = rep
                if len(stack) > 1:
                    stack_reps[v] = _stack_graph(device, stack, xs_s)
                if cuda and T in args.profile_tokens:
                    n, ms, by_name = _kernels_of(fast, xs[0])
                    row[f"{v}_kernels"], row[f"{v}_kernel_ms"], row[f"{v}_by_kernel_ms"] = n, ms, by_name
            except Exception as e:  # one variant failing (build, launch) leaves the others' numbers
                row[f"{v}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                _restore(saved)
            print(json.dumps({"T": T, "variant": v, "wall_s": time.monotonic() - t_start}), file=sys.stderr, flush=True)
            _write(args.out, res)
        rounds: dict[str, list[float]] = {v: [] for v in reps}
        srounds: dict[str, list[float]] = {v: [] for v in stack_reps}
        for _ in range(args.rounds):  # graphs replay whatever the switches say now: they hold their kernels
            for v, rep in reps.items():
                rounds[v].append(timer(device, rep, args.reps, warmup=5))
            for v, rep in stack_reps.items():
                srounds[v].append(timer(device, rep, max(10, args.reps // 4), warmup=3) / len(stack))
            _rounds_into(row, rounds, srounds, floor_ms)
            _write(args.out, res)
    res["wall_s"] = time.monotonic() - t_start
    return res


def _rounds_into(row: dict[str, Any], rounds: dict[str, list[float]], srounds: dict[str, list[float]],
                 floor_ms: float) -> None:
    """The medians of the rounds so far (one layer a replay; stacked layers)."""
    for v, ts in srounds.items():
            row[f"{v}_stack_ms"] = statistics.median(ts)
            row[f"{v}_stack_ms_rounds"] = ts
            row[f"{v}_stack_over_floor"] = row[f"{v}_stack_ms"] / row["stack_floor_ms"]
    for v, ts in rounds.items():
        row[f"{v}_graph_ms"] = statistics.median(ts)
        row[f"{v}_graph_ms_rounds"] = ts
        row[f"{v}_over_floor"] = row[f"{v}_graph_ms"] / floor_ms


def _stack_floor_ms(layers: list[Any], xs: list[torch.Tensor], bps: float) -> float:
    """The mean HBM floor of layer i on input i (its touched experts + its gate)."""
    total = 0.0
    with torch.no_grad():
        for m, x in zip(layers, xs):
            m.tokens_per_expert_E.zero_()
            m(x)
            total += (int((m.tokens_per_expert_E > 0).sum()) * 3 * D * F * 2 + E * D * 2) / bps * 1e3
    return total / len(layers)


def _stack_graph(device: torch.device, layers: list[Any], xs: list[torch.Tensor]) -> Any:
    """One CUDA graph of layer i on static input i for every i (the current switches)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            for m, x in zip(layers, xs):
                m(x)
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for m, x in zip(layers, xs):
            m(x)

    def replay(i: int) -> None:
        graph.replay()
    return replay


def _eager(model: Any, xs: list[torch.Tensor], v: str) -> Any:
    """The dry run's stand-in for a graph replay: an eager call with v's switches."""
    from spmd_moe.kernels import decode as dk

    def call(i: int) -> None:
        saved = _switches()
        _configure(v)
        try:
            with torch.no_grad():
                model(xs[i % len(xs)])
        finally:
            _restore(saved)
    return call


def summarize_alternating(res: dict[str, Any]) -> str:
    """Per T: each variant's graph time (median of rounds, min-max of the round medians)
    and x floor; the device time per kernel; the best slot tiles."""
    lines = [f"{res.get('device')}  {res.get('rounds')} rounds x {res.get('reps')} replays, alternating;"
             f" defaults {res.get('defaults')}"]
    for row in res.get("rows", []):
        lines.append(f"T={row['T']:<3} floor {row['floor_ms'] * 1e3:6.1f} us ({row['touched_experts']} experts)")
        for v in ALT_VARIANTS + ["split", "split_fused", "split_pdl", "split_fused_pdl"]:
            if f"{v}_error" in row:
                lines.append(f"    {v:15s} ERROR {row[f'{v}_error'][:200]}")
            if f"{v}_graph_ms" in row:
                ts = row[f"{v}_graph_ms_rounds"]
                by = row.get(f"{v}_by_kernel_ms", {})
                lines.append(f"    {v:15s} {row[f'{v}_graph_ms'] * 1e3:6.1f} us  x{row[f'{v}_over_floor']:.2f} floor"
                             f"  (rounds {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})  diff vs torch "
                             f"{row.get(f'{v}_max_abs_diff_vs_torch', float('nan')):.2g} (vs 1st variant "
                             f"{row.get(next((k for k in row if k.startswith(f'{v}_max_abs_diff_vs_') and not k.endswith('torch')), ''), float('nan')):.2g})  routing equal "
                             f"{row.get(f'{v}_routing_equal')}  kernels(us): "
                             + ", ".join(f"{k[:14]} {x * 1e3:.1f}" for k, x in by.items()))
            if f"{v}_stack_ms" in row:
                ts = row[f"{v}_stack_ms_rounds"]
                lines.append(f"    {v:15s} {row[f'{v}_stack_ms'] * 1e3:6.1f} us  x{row[f'{v}_stack_over_floor']:.2f} floor"
                             f"  (rounds {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})  per layer of {res.get('stack')} in one graph"
                             f" (floor {row['stack_floor_ms'] * 1e3:.1f} us)")
    for row in res.get("rows", []):
        best = min((v for v in ALT_VARIANTS if f"{v}_graph_ms" in row), key=lambda v: row[f"{v}_graph_ms"], default=None)
        goal = "2.5" if row["T"] == 1 else "2.0" if row["T"] <= 8 else "1.5"
        if best:
            lines.append(f"T={row['T']}: best {best} x{row[f'{best}_over_floor']:.2f} floor (goal {goal}; one layer a replay)")
        sbest = min((v for v in ALT_VARIANTS if f"{v}_stack_ms" in row), key=lambda v: row[f"{v}_stack_ms"], default=None)
        if sbest:
            lines.append(f"T={row['T']}: best {sbest} x{row[f'{sbest}_stack_over_floor']:.2f} floor (goal {goal};"
                         f" {res.get('stack')} layers a replay)")
    return "\n".join(lines)


def _write(path: str | None, res: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(res, indent=1))


def tiled_sweep(fast: Any, device: torch.device, args: argparse.Namespace, t_start: float,
                res_so_far: dict[str, Any]) -> list[dict[str, Any]]:
    """Graph time of the tiled variant at T=1 and T=8 (both use TILES) per tile choice,
    with programmatic dependent launch; stops at --budget-s."""
    from spmd_moe.kernels import decode as dk

    base, base_variant, base_pdl = dict(dk.TILES), dk.SPLIT["variant"], dk.LAUNCH["pdl"]
    dk.SPLIT["variant"], dk.LAUNCH["pdl"] = "tiled", True
    out: list[dict[str, Any]] = []
    g = torch.Generator(device=device).manual_seed(4)
    xs = {T: [torch.randn(T, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4)] for T in (1, 8)}
    keys = ("up_f", "up_d", "down_n", "down_f", "warps", "stages", "gate_e")
    choices: list[tuple[int, ...]] = [
        (32, 128, 64, 128, 4, 3), (16, 128, 64, 128, 4, 3), (32, 128, 64, 128, 4, 3, 2), (32, 128, 64, 128, 4, 3, 1),
        (16, 128, 32, 128, 4, 3), (32, 128, 64, 128, 4, 4),
        (16, 128, 64, 128, 4, 4), (32, 128, 32, 128, 4, 3), (16, 256, 32, 256, 4, 3), (32, 128, 64, 128, 4, 5),
        (32, 256, 64, 256, 8, 3), (16, 128, 128, 64, 4, 4), (32, 128, 64, 128, 8, 4), (16, 64, 32, 64, 2, 4),
        (64, 128, 128, 128, 8, 3), (16, 256, 64, 128, 4, 3), (32, 64, 64, 64, 4, 5), (32, 256, 32, 128, 4, 3),
    ]
    for ch in choices:
        if time.monotonic() - t_start > args.budget_s:
            out.append({"stopped": "budget"})
            break
        dk.TILES.clear()
        dk.TILES.update(base)
        dk.TILES.update(dict(zip(keys, ch)))
        row: dict[str, Any] = {"tiles": dict(zip(keys, ch))}
        for T in (1, 8):
            try:
                rep = try_graph(device, fast, xs[T])
                row[f"T{T}_ms"] = timer(device, rep, 200, warmup=10) if rep else None
            except Exception as e:  # a tile choice Triton cannot build (shared memory): note it, go on
                row[f"T{T}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
        _write(args.out, {**res_so_far, "tiled_sweep": out})
    dk.TILES.clear()
    dk.TILES.update(base)
    dk.SPLIT["variant"], dk.LAUNCH["pdl"] = base_variant, base_pdl
    return out


def split_sweep(fast: Any, device: torch.device, args: argparse.Namespace, t_start: float,
                res_so_far: dict[str, Any]) -> list[dict[str, Any]]:
    """Graph time of the split_fused variant at T=1 per SPLIT_TILES choice (pick the
    defaults from this); stops at --budget-s so that the JSON is still written."""
    from spmd_moe.kernels import decode as dk

    base, base_variant = dict(dk.SPLIT_TILES), dk.SPLIT["variant"]
    dk.SPLIT["variant"] = "split_fused"
    out = []
    g = torch.Generator(device=device).manual_seed(3)
    xs = [torch.randn(1, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4)]
    choices: list[tuple[Any, ...]] = [  # (up_f, up_d, up_split, down_n, down_f, down_split, warps, stages, swiglu[, gate_e])
        (32, 128, 4, 64, 128, 2, 4, 3, "up"), (32, 128, 4, 64, 128, 2, 4, 3, "down"),
        (32, 128, 4, 64, 128, 2, 4, 3, "up", 1), (32, 128, 4, 64, 128, 2, 4, 3, "up", 2),
        (32, 128, 2, 64, 128, 1, 4, 3, "up"), (32, 128, 4, 32, 128, 2, 4, 3, "up"),
        (16, 128, 4, 32, 128, 2, 4, 3, "up"), (16, 256, 4, 32, 128, 3, 4, 3, "up"),
        (32, 256, 2, 64, 256, 1, 4, 3, "up"), (32, 128, 8, 64, 64, 4, 4, 3, "up"),
        (16, 128, 8, 16, 128, 2, 4, 3, "up"), (32, 128, 4, 64, 128, 2, 8, 4, "up"),
        (64, 128, 8, 64, 128, 2, 4, 3, "up"), (32, 64, 8, 32, 64, 4, 4, 4, "up"),
        (16, 64, 16, 32, 64, 4, 2, 4, "down"), (32, 128, 1, 32, 128, 1, 4, 3, "up"),
    ]
    keys = ("up_f", "up_d", "up_split", "down_n", "down_f", "down_split", "warps", "stages", "swiglu", "gate_e")
    for ch in choices:
        if time.monotonic() - t_start > args.budget_s:
            out.append({"stopped": "budget"})
            break
        dk.SPLIT_TILES.update(base)
        dk.SPLIT_TILES.update(dict(zip(keys, ch)))
        try:
            rep = try_graph(device, fast, xs)
            ms = timer(device, rep, 200, warmup=10) if rep else None
        except Exception as e:  # a tile choice Triton cannot build (shared memory): note it, go on
            rep, ms = None, None
            print(f"tiles {ch}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"tiles": dict(zip(keys, ch)), "T1_ms": ms}
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
        _write(args.out, {**res_so_far, "split_sweep": out})
    dk.SPLIT_TILES.update(base)
    dk.SPLIT["variant"] = base_variant
    return out


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


def summarize(res: dict[str, Any]) -> str:
    """A few lines per T: graph ms and x floor per variant, the kernels' device times."""
    lines = [f"{res.get('device')}  split={res.get('split')}  split_tiles={res.get('split_tiles')}"]
    for row in res.get("rows", []):
        parts = [f"T={row['T']:<3} floor {row['floor_ms'] * 1e3:6.1f} us"]
        if "torch_graph_ms" in row:
            parts.append(f"torch {row['torch_graph_ms'] * 1e3:6.1f} us ({row['torch_over_floor']:.2f}x)")
        for pre in ("fast", "tiled_pdl", "split", "split_fused", "split_pdl", "split_fused_pdl"):
            if f"{pre}_graph_ms" in row:
                name = "tiled" if pre == "fast" else pre
                diff = row.get(f"{pre}_max_abs_diff_vs_torch", row.get("max_abs_diff_vs_torch", float("nan")))
                parts.append(f"{name} {row[f'{pre}_graph_ms'] * 1e3:6.1f} us ({row[f'{pre}_over_floor']:.2f}x,"
                             f" diff {diff:.2g})")
        lines.append("  ".join(parts))
        for pre in ("fast", "tiled_pdl", "split", "split_fused", "split_pdl", "split_fused_pdl"):
            if f"{pre}_error" in row:
                lines.append(f"    {pre:12s} ERROR {row[f'{pre}_error'][:200]}")
            by = row.get(f"{pre}_by_kernel_ms")
            if by:
                lines.append(f"    {pre:12s} kernels: " + ", ".join(f"{k[:16]} {v * 1e3:.1f}" for k, v in by.items()))
    tw = [r for r in res.get("tiled_sweep", []) if r.get("T1_ms")]
    for r in sorted(tw, key=lambda r: float(r["T1_ms"]))[:6]:
        t8 = r.get("T8_ms")
        lines.append(f"  tiled sweep (pdl) T=1 {r['T1_ms'] * 1e3:6.1f} us  T=8 {t8 * 1e3 if t8 else float('nan'):6.1f} us"
                     f"  {r['tiles']}")
    sw = [r for r in res.get("split_sweep", []) if r.get("T1_ms")]
    for r in sorted(sw, key=lambda r: float(r["T1_ms"]))[:5]:
        lines.append(f"  sweep T=1 split_fused {r['T1_ms'] * 1e3:6.1f} us  {r['tiles']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spmd_moe.apps.bench.decode")
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--variants", nargs="+", default=["tiled", "tiled_pdl", "split", "split_fused", "split_fused_pdl"],
                   choices=["tiled", "tiled_pdl", "split", "split_fused", "split_pdl", "split_fused_pdl"])
    p.add_argument("--split-max-t", type=int, default=8, help="T up to which the split variants are timed")
    p.add_argument("--split-sweep", action="store_true", help="SPLIT_TILES choices at T=1 (split_fused)")
    p.add_argument("--tiled-sweep", action="store_true", help="TILES choices at T=1 and 8 (tiled, with PDL)")
    p.add_argument("--torch-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="time the torch path in a CUDA graph too")
    p.add_argument("--torch-profile", action=argparse.BooleanOptionalAction, default=True,
                   help="kernel count and device time of the torch path too")
    p.add_argument("--budget-s", type=float, default=90.0, help="the split sweep stops after this much wall time")
    p.add_argument("--summarize", default=None, metavar="JSON", help="print the summary of an earlier run's JSON")
    p.add_argument("--alternate", action="store_true",
                   help="the --alt-variants timed in turn, --rounds rounds per T (run_alternating)")
    p.add_argument("--alt-variants", nargs="+", default=ALT_VARIANTS,
                   choices=ALT_VARIANTS + ["split", "split_fused", "split_pdl", "split_fused_pdl"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--profile-tokens", type=int, nargs="*", default=[1, 8, 64],
                   help="T at which --alternate profiles each variant's kernels")
    p.add_argument("--stack", type=int, default=0, help="also time N distinct layers in one graph (per layer)")
    p.add_argument("--slot-max-t", type=int, default=8, help="T up to which the slot variants are timed")
    p.add_argument("--small", action="store_true", help="tiny shapes (D=64 F=32 E=16 top-4): a dry run; on CPU"
                   " with TRITON_INTERPRET=1 SPMD_MOE_DECODE_INTERPRET=1")
    args = p.parse_args(argv)
    if args.summarize:
        import os

        if not os.path.exists(args.summarize):
            print(f"no {args.summarize}: the bench wrote nothing (see the log)")
            return 0
        with open(args.summarize) as f:
            r = json.load(f)
            print(summarize_alternating(r) if r.get("mode") == "alternating" else summarize(r))
        return 0
    if args.small:
        global D, F, E, K
        D, F, E, K = 64, 32, 16, 4
    if not torch.cuda.is_available() and not (args.small and args.alternate):
        print(json.dumps({"skipped": "needs CUDA (or --small --alternate in Triton's interpreter)"}))
        return 0
    res = run_alternating(args) if args.alternate else run(args)
    _write(args.out, res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
