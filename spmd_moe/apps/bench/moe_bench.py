"""MoE layer benchmark: spmd_moe against torchtitan 0.3.0's MoE on the same weights,
the raw grouped GEMMs and the HBM weight-read floor, for a list of token counts.

Shapes: ``--full`` is one Qwen3-30B-A3B MoE layer (D=2048, F=768, E=128, top-8, bf16,
softmax router with renormalised top-k, no shared expert) for T in {1, 8, 64, 512,
4096, 32768}; the default is a small layer and short T list that runs in seconds on a CPU.

Every timed call rotates through several random inputs, so that repeated calls touch
different experts and the GPU's L2 cache (50 MB on an H100) cannot hold the weights
they read. GPU times are CUDA-event medians; CPU times are wall-clock medians.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

FULL_T = [1, 8, 64, 512, 4096, 32768]
SMALL_T = [1, 16, 64]
H100_SXM_HBM_BPS = 3.35e12  # vendor datasheet, H100 SXM5 80 GB HBM3
H200_HBM_BPS = 4.8e12  # vendor datasheet, H200 141 GB HBM3e


def nominal_hbm_bps(name: str) -> float:
    return H200_HBM_BPS if "H200" in name else H100_SXM_HBM_BPS


@dataclass(frozen=True)
class Shapes:
    dim: int
    hidden: int
    experts: int
    top_k: int
    tokens: tuple[int, ...]
    dtype: str


def shapes_for(full: bool, device: torch.device) -> Shapes:
    if full:
        return Shapes(2048, 768, 128, 8, tuple(FULL_T), "bfloat16")
    # Small: dims multiples of 8 so the CUDA grouped GEMM takes them too.
    return Shapes(128, 64, 8, 2, tuple(SMALL_T), "bfloat16")


# The running `spmd-moe bench`'s progress (spmd_moe.apps.progress), set by bench.run.
PROGRESS: Any = None


def log(msg: str) -> None:
    if PROGRESS is not None:
        PROGRESS.log(msg)
    else:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def step(what: str) -> None:
    """One unit of the bench's progress done (a T, the overhead, the plot)."""
    if PROGRESS is not None:
        PROGRESS.step(what)


# --------------------------------------------------------------------------- timing


def timer(device: torch.device, fn: Callable[[int], object], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn(i) over reps calls (i counts calls, for rotation)."""
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        ts = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        ts = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))


def reps_for(device: torch.device, T: int, full: bool) -> int:
    if device.type != "cuda":
        return 5 if full else 3
    return 30 if T <= 4096 else 12


# --------------------------------------------------------------------------- models


def build_spmd(sh: Shapes, device: torch.device) -> torch.nn.Module:
    import spmd_moe as sm

    cfg = sm.MoEConfig(
        dim=sh.dim, hidden_dim=sh.hidden, num_experts=sh.experts, top_k=sh.top_k,
        score_func="softmax", route_norm=True, param_dtype=getattr(torch, sh.dtype),
    )
    return sm.MoE(cfg, device=device)


def build_titan(sh: Shapes, device: torch.device) -> torch.nn.Module:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = MoE.Config(
        num_experts=sh.experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=sh.dim, hidden_dim=sh.hidden, num_experts=sh.experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=sh.experts, top_k=sh.top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=sh.experts, gate=Linear.Config(in_features=sh.dim, out_features=sh.experts),
            top_k=sh.top_k, score_func="softmax", route_norm=True,
        ),
        load_balance_coeff=None,
    )
    m: torch.nn.Module = cfg.build()
    return m.to(device=device, dtype=getattr(torch, sh.dtype))


@torch.no_grad()
def share_weights(spmd: torch.nn.Module, titan: torch.nn.Module | None, sh: Shapes, device: torch.device) -> None:
    """Random weights (std 0.02), the same in both layers."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, sh.dtype)
    E, F_, D = sh.experts, sh.hidden, sh.dim

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dt)

    ws = {"w1_EFD": rnd(E, F_, D), "w2_EDF": rnd(E, D, F_), "w3_EFD": rnd(E, F_, D)}
    gate = rnd(E, D)
    ex = spmd.routed_experts.inner_experts
    for k, v in ws.items():
        getattr(ex, k).copy_(v)
    spmd.router.gate.weight.copy_(gate)
    spmd.tokens_per_expert_E.zero_()
    if titan is not None:
        tex = titan.routed_experts.inner_experts
        for k, v in ws.items():
            getattr(tex, k).copy_(v)
        titan.router.gate.weight.copy_(gate)


def titan_available() -> tuple[bool, str]:
    try:
        import torchtitan.models.common.moe  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"{type(e).__name__}: {e}"
    return True, ""


# --------------------------------------------------------------------------- pieces


def hbm_copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return None
    n = 1 << 29  # 1 GiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = timer(device, lambda i: b.copy_(a), reps=20)
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def routed_for(spmd: torch.nn.Module, x_TD: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(expert-sorted rows, counts per expert, touched experts) as spmd_moe's router picks."""
    with torch.no_grad():
        _, ids_TK, _ = spmd.router(x_TD, None)
        flat = ids_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=spmd.cfg.num_experts)
        return x_TD[order // K].contiguous(), counts, int((counts > 0).sum())


def raw_grouped_gemms(x_RD: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The three expert GEMMs and the SwiGLU, nothing else: torch._grouped_mm."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = F.silu(torch._grouped_mm(x_RD, w1.transpose(-2, -1), offs=offs))
    h = h * torch._grouped_mm(x_RD, w3.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def try_graph(device: torch.device, model: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor]) -> Callable[[int], object] | None:
    """A CUDA-graph replay of model(x) on a static input buffer, or None if capture fails."""
    if device.type != "cuda":
        return None
    static_x = xs[0].clone()
    try:  # a host sync inside a capture would invalidate it: look for one first
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        with torch.no_grad():
            model(static_x)
    except Exception as e:
        log(f"no CUDA graph: the forward synchronizes ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            model(static_x)
    except Exception as e:
        log(f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        torch.cuda.synchronize(device)
        return None

    def replay(i: int) -> None:
        static_x.copy_(xs[i % len(xs)])
        graph.replay()

    return replay


STACK = 8  # layers in one CUDA graph for the per-layer decode figure (a model's decode step is one graph)


def try_graph_stack(device: torch.device, model: torch.nn.Module, xs: list[torch.Tensor],
                    call: Callable[[torch.nn.Module, torch.Tensor], object] | None = None) -> Callable[[int], object] | None:
    """One CUDA graph of len(xs) copies of model (their own weights, at other addresses: no
    L2 reuse between layers), copy i on static input i, as a model's decode step runs its
    layers; replay(i) replays the whole stack (divide its time by len(xs)). No per-layer graph
    launch or input copy, which the one-layer replay of try_graph pays. None if it fails."""
    if device.type != "cuda":
        return None
    import copy

    run = call or (lambda m, x: m(x))
    try:
        layers = [model] + [copy.deepcopy(model) for _ in range(len(xs) - 1)]
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                for m, x in zip(layers, xs):
                    run(m, x)
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            for m, x in zip(layers, xs):
                run(m, x)
    except Exception as e:
        log(f"stacked CUDA graph failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        torch.cuda.synchronize(device)
        return None

    def replay(i: int) -> None:
        graph.replay()

    replay.layers = layers  # type: ignore[attr-defined]  # keep the copies alive with the graph
    return replay


# --------------------------------------------------------------------------- run


def planned_tokens(args: Any) -> tuple[int, ...]:
    """The token counts run(args) will time (for the progress bar's total)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    override = getattr(args, "tokens", None)
    return tuple(override) if override else shapes_for(bool(getattr(args, "full", False)), device).tokens


def run(args: Any) -> dict[str, Any]:
    full = bool(getattr(args, "full", False))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens_override = getattr(args, "tokens", None)
    sh = shapes_for(full, device)
    if tokens_override:
        sh = Shapes(sh.dim, sh.hidden, sh.experts, sh.top_k, tuple(tokens_override), sh.dtype)
    dt = getattr(torch, sh.dtype)
    torch.manual_seed(0)
    if device.type == "cpu" and not full:
        # Tiny shapes on a shared CPU: one thread times the layer, not thread hand-offs.
        torch.set_num_threads(1)
    machine = machine_info(device)
    log(f"MoE bench on {machine['device_name']} (torch {torch.__version__}), shapes {sh}")

    have_titan, titan_err = titan_available()
    spmd = build_spmd(sh, device)
    titan = build_titan(sh, device) if have_titan else None
    share_weights(spmd, titan, sh, device)
    hbm_bps = hbm_copy_bandwidth(device)
    nominal_bps = nominal_hbm_bps(machine["device_name"]) if device.type == "cuda" else None
    bytes_per_expert = 3 * sh.dim * sh.hidden * torch.finfo(dt).bits // 8
    ex = spmd.routed_experts.inner_experts
    n_inputs = 8 if device.type == "cuda" else 2
    rows: list[dict[str, Any]] = []

    for ti, T in enumerate(sh.tokens):
        reps = reps_for(device, T, full)
        xs = [torch.randn(T, sh.dim, device=device, dtype=dt) for _ in range(n_inputs)]
        g_TD = torch.randn(T, sh.dim, device=device, dtype=dt)
        row: dict[str, Any] = {"T": T}

        # correctness on the same weights: spmd_moe vs torchtitan
        with torch.no_grad():
            y = spmd(xs[0])
            if titan is not None:
                yt = titan(xs[0].unsqueeze(0)).squeeze(0)
                row["rel_err_vs_titan"] = rel_err(y, yt)

        # HBM floor: bytes of the experts the batch touches, read once
        routed = [routed_for(spmd, x, sh.top_k) for x in xs]
        touched = statistics.mean(r[2] for r in routed)
        row["touched_experts"] = touched
        if nominal_bps is not None:
            row["floor_ms"] = touched * bytes_per_expert / nominal_bps * 1e3
        if hbm_bps is not None:
            row["floor_ms_measured_bw"] = touched * bytes_per_expert / hbm_bps * 1e3

        with torch.no_grad():
            row["gemm_ms"] = timer(device, lambda i: raw_grouped_gemms(
                routed[i % n_inputs][0], routed[i % n_inputs][1], ex.w1_EFD, ex.w2_EDF, ex.w3_EFD), reps)
            # GPU: spmd_moe and torchtitan in turn, 3 rounds, the median of the rounds' medians
            # (clock and host drift then fall on both alike).
            xs3 = [x.unsqueeze(0) for x in xs]
            rounds: dict[str, list[float]] = {"spmd": [], "titan": []}
            for _ in range(3 if device.type == "cuda" else 1):
                rounds["spmd"].append(timer(device, lambda i: spmd(xs[i % n_inputs]), reps))
                if titan is not None:
                    rounds["titan"].append(timer(device, lambda i: titan(xs3[i % n_inputs]), reps))
            for name, ts in rounds.items():
                if ts:
                    row[f"{name}_fwd_ms"] = statistics.median(ts)
                    row[f"{name}_fwd_ms_rounds"] = ts
        log(f"T={T} ({ti + 1}/{len(sh.tokens)}) fwd: spmd {row['spmd_fwd_ms']:.3f} ms, "
            f"titan {row.get('titan_fwd_ms', float('nan')):.3f} ms, gemms {row['gemm_ms']:.3f} ms")

        # decode sizes: CUDA-graph replays (how vLLM runs decode)
        if device.type == "cuda":
            rep = try_graph(device, spmd, xs)
            if rep is not None:
                row["spmd_fwd_graph_ms"] = timer(device, rep, reps)
            if titan is not None:
                rep_t = try_graph(device, lambda x: titan(x.unsqueeze(0)), xs)
                if rep_t is not None:
                    row["titan_fwd_graph_ms"] = timer(device, rep_t, reps)
            if T <= 64:  # per layer in a graph of STACK layers (copies), as a model's decode step
                for name, model, call in (("spmd", spmd, None), ("titan", titan, lambda m, x: m(x.unsqueeze(0)))):
                    if model is None or f"{name}_fwd_graph_ms" not in row:  # no one-layer graph: none stacked
                        continue
                    rep_s = try_graph_stack(device, model, xs[:STACK], call)
                    if rep_s is not None:
                        row[f"{name}_fwd_graph_stack_ms"] = timer(device, rep_s, max(10, reps // 4)) / STACK
                    del rep_s
                    torch.cuda.empty_cache()

        # forward + backward (input and weight gradients)
        def fwd_bwd(model: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], three_d: bool) -> Callable[[int], object]:
            xg = [x.clone().requires_grad_(True) for x in xs]

            def step(i: int) -> None:
                for p in params:
                    p.grad = None
                x = xg[i % n_inputs]
                x.grad = None
                y = model(x.unsqueeze(0) if three_d else x)
                y.backward(g_TD.unsqueeze(0) if three_d else g_TD)
            return step

        row["spmd_fwdbwd_ms"] = timer(device, fwd_bwd(spmd, list(spmd.parameters()), False), reps)
        if titan is not None:
            row["titan_fwdbwd_ms"] = timer(device, fwd_bwd(titan, list(titan.parameters()), True), reps)
        _ratios(row)
        log(f"T={T} fwd+bwd: spmd {row['spmd_fwdbwd_ms']:.3f} ms, titan {row.get('titan_fwdbwd_ms', float('nan')):.3f} ms")
        rows.append(row)
        step(f"T={T} done")
        del xs, routed
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return {
        "machine": machine,
        "shapes": asdict(sh),
        "torchtitan": "0.3.0" if have_titan else f"unavailable: {titan_err}",
        "hbm_copy_GBps": None if hbm_bps is None else hbm_bps / 1e9,
        "hbm_nominal_GBps": None if nominal_bps is None else nominal_bps / 1e9,
        "expert_bytes": bytes_per_expert,
        "rows": rows,
        "targets": targets(rows, device),
    }


def _ratios(row: dict[str, Any]) -> None:
    if "titan_fwd_ms" in row:
        row["speedup_fwd_vs_titan"] = row["titan_fwd_ms"] / row["spmd_fwd_ms"]
    if "titan_fwdbwd_ms" in row:
        row["speedup_fwdbwd_vs_titan"] = row["titan_fwdbwd_ms"] / row["spmd_fwdbwd_ms"]
    if "floor_ms" in row:
        row["fwd_over_floor"] = row["spmd_fwd_ms"] / row["floor_ms"]
        if "spmd_fwd_graph_ms" in row:
            row["graph_fwd_over_floor"] = row["spmd_fwd_graph_ms"] / row["floor_ms"]
        if "spmd_fwd_graph_stack_ms" in row:
            row["graph_stack_fwd_over_floor"] = row["spmd_fwd_graph_stack_ms"] / row["floor_ms"]
    row["fwd_over_gemm"] = row["spmd_fwd_ms"] / row["gemm_ms"]


# Issue 12's goal column (one H200, CUDA graphs for decode): decode T -> the most x the
# HBM floor, and the prefill T=32768 speedups over torchtitan (forward; forward+backward).
DECODE_GOALS = {1: 2.5, 8: 2.0, 64: 1.5}
PREFILL_FWD_GOAL, FWDBWD_GOAL = 2.0, 1.3


def targets(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The issue's targets, judged only on the full shapes on a GPU."""
    by_t = {r["T"]: r for r in rows}
    out: dict[str, Any] = {}
    if device.type != "cuda":
        return {"note": "targets are judged on an H200 with --full"}
    r = by_t.get(32768)
    if r and "speedup_fwd_vs_titan" in r:
        out["prefill_32768_fwd_speedup"] = {"value": r["speedup_fwd_vs_titan"], "target": f">= {PREFILL_FWD_GOAL}",
                                            "met": r["speedup_fwd_vs_titan"] >= PREFILL_FWD_GOAL}
    if r and "speedup_fwdbwd_vs_titan" in r:
        out["fwdbwd_32768_speedup"] = {"value": r["speedup_fwdbwd_vs_titan"], "target": f">= {FWDBWD_GOAL}",
                                       "met": r["speedup_fwdbwd_vs_titan"] >= FWDBWD_GOAL}
    for T, goal in DECODE_GOALS.items():
        r = by_t.get(T)
        if r and "fwd_over_floor" in r:
            # vLLM runs a decode step as one CUDA graph of all layers: judged per layer in a
            # graph of STACK layers; the one-layer replay (plus its launch and input copy) is
            # reported beside it, with its own verdict.
            one = r.get("graph_fwd_over_floor", r["fwd_over_floor"])
            judged = r.get("graph_stack_fwd_over_floor", one)
            out[f"decode_{T}_over_floor"] = {
                "eager": r["fwd_over_floor"], "graph_one_layer": r.get("graph_fwd_over_floor"),
                "graph_per_layer_of_stack": r.get("graph_stack_fwd_over_floor"),
                "target": f"<= {goal} (per layer, {STACK} layers in one CUDA graph)", "met": judged <= goal,
                "met_one_layer_replay": one <= goal,
            }
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, sms=p.multi_processor_count, mem_GiB=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    else:
        info.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


# --------------------------------------------------------------------------- report


def table(res: dict[str, Any]) -> str:
    cols = [("T", "T", "{:d}"), ("spmd_fwd_ms", "spmd fwd", "{:.3f}"), ("titan_fwd_ms", "titan fwd", "{:.3f}"),
            ("speedup_fwd_vs_titan", "x titan", "{:.2f}"), ("gemm_ms", "GEMMs", "{:.3f}"),
            ("floor_ms", "HBM floor", "{:.3f}"), ("spmd_fwd_graph_ms", "spmd graph", "{:.3f}"),
            ("titan_fwd_graph_ms", "titan graph", "{:.3f}"),
            ("spmd_fwd_graph_stack_ms", f"spmd graph/layer of {STACK}", "{:.4f}"),
            ("titan_fwd_graph_stack_ms", f"titan graph/layer of {STACK}", "{:.4f}"),
            ("spmd_fwdbwd_ms", "spmd f+b", "{:.3f}"), ("titan_fwdbwd_ms", "titan f+b", "{:.3f}"),
            ("speedup_fwdbwd_vs_titan", "x titan f+b", "{:.2f}"), ("rel_err_vs_titan", "rel err", "{:.1e}")]
    cols = [c for c in cols if any(c[0] in r for r in res["rows"])]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    T = [r["T"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series_fwd = [("spmd_fwd_ms", "spmd_moe fwd (eager)", "o-"), ("spmd_fwd_graph_ms", "spmd_moe fwd (CUDA graph)", "o--"),
                  ("spmd_fwd_graph_stack_ms", f"spmd_moe fwd (per layer, {STACK} in one graph)", "o:"),
                  ("titan_fwd_ms", "torchtitan 0.3.0 fwd", "s-"), ("gemm_ms", "raw grouped GEMMs", "^:"),
                  ("floor_ms", "HBM weight-read floor", "k-")]
    series_bwd = [("spmd_fwdbwd_ms", "spmd_moe fwd+bwd", "o-"), ("titan_fwdbwd_ms", "torchtitan fwd+bwd", "s-")]
    for ax, series, title in ((axes[0], series_fwd, "forward"), (axes[1], series_bwd, "forward + backward")):
        for key, label, style in series:
            pts = [(r["T"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    sh = res["shapes"]
    fig.suptitle(f"MoE layer D={sh['dim']} F={sh['hidden']} E={sh['experts']} top-{sh['top_k']} {sh['dtype']} "
                 f"on {res['machine']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    del T
