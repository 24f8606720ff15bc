"""Cost of batch-invariant mode: the same MoE layer, normal vs invariant, same process.

    python -m spmd_moe.apps.bench.invariant [--device cuda|cpu] [--out cost.json]

CUDA: Qwen3-30B-A3B's MoE layer (D=2048, F=768, E=128, top-8, softmax + route_norm,
bf16), EP=1, forward (inference, no autograd) and forward+backward (sum of squares,
input requires grad) at T = 1 .. 32768; median of CUDA-event timings, the two modes
interleaved per T. Targets (issue 16): invariant/normal <= 1.5 forward, <= 2 fwd+bwd.
The forward is also timed as CUDA-graph replays (how vLLM decodes), both modes, where
the layer captures; a failed capture is reported with its error, not raised.

CPU: the CI shapes (tests/test_batch_invariance.py's layer: D=32, F=48, E=8, top-2,
shared experts 64, expert bias; and the parity model's MoE: D=128, F=48, E=8, top-2)
at the token counts the tests and `spmd-moe parity` run, plus two larger T. Time is
the thread's CPU time (time.thread_time; one thread), best of several repetitions, so
other processes on a shared machine do not inflate it. Target: <= 3x.

The table goes to stdout (markdown) and --out (JSON); progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _layer(cfg_kw: dict[str, Any], device: str, seed: int = 0) -> Any:
    import spmd_moe as sm

    m = sm.MoE(sm.MoEConfig(**cfg_kw), device=device)
    m.init_states(seed=seed)
    return m


def _step(moe: Any, x: torch.Tensor, bwd: bool) -> None:
    if bwd:
        xg = x.detach().requires_grad_(True)
        moe(xg).float().square().sum().backward()
    else:
        with torch.no_grad():
            moe(x)


def _cuda_ms(fn: Any, reps: int) -> float:
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return float(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)))


def _graph(moe: Any, x: torch.Tensor, mode: bool) -> tuple[Any, str | None]:
    """The layer's inference forward captured in a CUDA graph in the given mode (warm-up
    on a side stream first, as vLLM does), or (None, why) where capture fails."""
    from spmd_moe.batch_invariant import batch_invariant

    try:
        with torch.no_grad(), batch_invariant(mode):
            s = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    moe(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                moe(x)
        g.replay()
        torch.cuda.synchronize()
        return g, None
    except Exception as e:  # noqa: BLE001 - reported in the table, not raised
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def measure_graph(moe: Any, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Graph replay ms per forward, normal vs invariant (interleaved rounds of 10
    replays each timed by CUDA events; median), or why capture failed."""
    graphs = {m: _graph(moe, x, m) for m in (False, True)}
    out: dict[str, Any] = {}
    res: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for m, (g, _why) in graphs.items():
            if g is not None:
                res[m].append(_cuda_ms(lambda: [g.replay() for _ in range(10)], 5) / 10)
    for m, key in ((False, "normal"), (True, "invariant")):
        g, why = graphs[m]
        out[f"graph_{key}_ms"] = round(float(statistics.median(res[m])), 4) if g is not None else None
        if why:
            out[f"graph_{key}_error"] = why
    if out["graph_normal_ms"] and out["graph_invariant_ms"]:
        out["graph_ratio"] = round(out["graph_invariant_ms"] / out["graph_normal_ms"], 2)
    del graphs
    return out


def kernel_profile(moe: Any, x: torch.Tensor, mode: bool, reps: int = 20, top: int = 8,
                   device: str = "cuda") -> dict[str, Any]:
    """Device time per inference forward, by kernel (torch.profiler; eager): where a
    mode's GPU time goes at this T. Returns {"kernels": [(name, us per forward)], "total_us"}."""
    from torch.profiler import ProfilerActivity, profile

    from spmd_moe.batch_invariant import batch_invariant

    act = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    want = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    with torch.no_grad(), batch_invariant(mode):
        for _ in range(3):
            moe(x)
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[act]) as prof:
            for _ in range(reps):
                moe(x)
            if device == "cuda":
                torch.cuda.synchronize()
    tot: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == want and (device == "cuda" or e.cpu_parent is None):
            tot[e.name] = tot.get(e.name, 0.0) + e.time_range.elapsed_us()
    rows = sorted(((n[:70], round(t / reps, 2)) for n, t in tot.items()), key=lambda r: -r[1])
    return {"kernels": rows[:top], "total_us": round(sum(t for _, t in rows), 2), "launches": len(tot)}


def _cpu_ms(fn: Any, inner: int) -> float:
    t0 = time.thread_time()
    for _ in range(inner):
        fn()
    return (time.thread_time() - t0) / inner * 1e3


def measure(moe: Any, x: torch.Tensor, bwd: bool, device: str, rounds: int,
            modes: tuple[bool, ...] = (False, True)) -> tuple[float, float]:
    """(normal ms, invariant ms): interleaved rounds; CUDA median of medians, CPU best."""
    from spmd_moe.batch_invariant import batch_invariant

    res: dict[bool, list[float]] = {False: [0.0], True: [0.0]}
    for m in modes:
        res[m] = []
    T = x.shape[0]
    for mode in modes:  # warm-up (Triton compile, allocator)
        with batch_invariant(mode):
            for _ in range(2):
                _step(moe, x, bwd)
    for _ in range(rounds):
        for mode in modes:
            with batch_invariant(mode):
                if device == "cuda":
                    res[mode].append(_cuda_ms(lambda: _step(moe, x, bwd), 5 if T >= 8192 else 10))
                else:
                    res[mode].append(_cpu_ms(lambda: _step(moe, x, bwd), max(1, 64 // max(T, 1))))
    pick = statistics.median if device == "cuda" else min
    return float(pick(res[False])), float(pick(res[True]))


CI_MAX_T = 29
GPU_LAYER: dict[str, Any] = dict(dim=2048, hidden_dim=768, num_experts=128, top_k=8, score_func="softmax",
                                 route_norm=True, param_dtype=torch.bfloat16)
CPU_LAYERS: dict[str, dict[str, Any]] = {
    "tests (D=32 F=48 E=8 k=2 shared=64)": dict(dim=32, hidden_dim=48, num_experts=8, top_k=2, score_func="softmax",
                                                route_norm=True, load_balance_coeff=1e-3, shared_hidden_dim=64),
    "parity (D=128 F=48 E=8 k=2)": dict(dim=128, hidden_dim=48, num_experts=8, top_k=2, score_func="softmax",
                                        route_norm=True),
}


class _PlainProgress:
    """Stand-in for spmd_moe.apps.progress where tqdm is missing (a bare GPU machine)."""

    def __init__(self, name: str) -> None:
        self.name, self.n = name, 0

    def status(self, what: str) -> None:
        print(f"[{self.name}] {what}", file=sys.stderr, flush=True)

    def step(self, what: str) -> None:
        self.n += 1
        print(f"[{self.name}] {self.n} {what}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(name: str, total: int, unit: str) -> Iterator[Any]:
    try:
        from spmd_moe.apps.progress import progress
    except ImportError:
        yield _PlainProgress(name)
        return
    with progress(name, total=total, unit=unit) as p:
        yield p


def run(device: str, gpu_ts: list[int], cpu_ts: list[int], bwd_max_t: int, rounds: int = 3,
        graphs: bool = True, generic: bool = True, out: str | None = None,
        profile_ts: tuple[int, ...] = ()) -> dict[str, Any]:
    """The table; with `out`, the JSON is rewritten after every case (a run cut short by a
    time limit still leaves the rows it finished)."""

    rows: list[dict[str, Any]] = []
    if device == "cuda":
        plan = [("Qwen3-30B-A3B MoE (D=2048 F=768 E=128 k=8 bf16)", GPU_LAYER, t, bwd)
                for t in gpu_ts for bwd in (False, True) if not bwd or t <= bwd_max_t]
    else:
        plan = [(name, kw, t, bwd) for name, kw in CPU_LAYERS.items() for t in cpu_ts for bwd in (False, True)]
    layers: dict[str, Any] = {}
    with _progress("invariant-bench", total=len(plan), unit="case") as p:
        for name, kw, T, bwd in plan:
            p.status(f"{name} T={T} {'fwd+bwd' if bwd else 'fwd'}")
            moe = layers.get(name)
            if moe is None:
                moe = layers[name] = _layer(kw, device)
            dtype = kw.get("param_dtype", torch.float32)
            x = torch.randn(T, kw["dim"], device=device, generator=torch.Generator(device=device).manual_seed(T)).to(dtype)
            n, i = measure(moe, x, bwd, device, rounds=rounds if device == "cuda" else 5)
            row = {"layer": name, "T": T, "pass": "fwd+bwd" if bwd else "fwd", "normal_ms": round(n, 4),
                   "invariant_ms": round(i, 4), "ratio": round(i / n, 2)}
            if device == "cuda" and graphs and not bwd:
                row.update(measure_graph(moe, x, rounds))
            if device == "cuda" and T in profile_ts and not bwd:
                try:
                    row["kernels_normal"] = kernel_profile(moe, x, False)
                    row["kernels_invariant"] = kernel_profile(moe, x, True)
                except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the table
                    row["kernels_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            if device == "cuda" and generic:
                # Second baseline: the same layer with kernels='torchtitan' (no fused decode
                # kernels): the generic path the invariant mode replaces GEMM for GEMM.
                gkey = name + " generic"
                if gkey not in layers:
                    layers[gkey] = _layer({**kw, "kernels": "torchtitan"}, device)
                ng, _ = measure(layers[gkey], x, bwd, device, rounds=2, modes=(False,))
                row.update(normal_generic_ms=round(ng, 4), ratio_vs_generic=round(i / ng, 2))
            rows.append(row)
            if out:
                with open(out, "w") as f:
                    json.dump(_summary(device, rows), f, indent=2)
            p.step(f"T={T} {'fwd+bwd' if bwd else 'fwd'}: {n:.3f} -> {i:.3f} ms ({i / n:.2f}x)")
    res = _summary(device, rows)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def _summary(device: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    machine: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            machine["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        machine.update(cpu=_cpu_name(), threads=torch.get_num_threads(), cores=os.cpu_count())
    targets = {"fwd": 1.5, "fwd+bwd": 2.0} if device == "cuda" else {"fwd": 3.0, "fwd+bwd": 3.0}
    # CPU target: at the CI shapes (the token counts the tests and `spmd-moe parity` run).
    in_scope = [r for r in rows if device == "cuda" or r["T"] <= CI_MAX_T]
    worst = {k: max((r["ratio"] for r in in_scope if r["pass"] == k), default=None) for k in targets}
    graph_ratios = [r["graph_ratio"] for r in rows if r.get("graph_ratio") is not None]
    return {"device": device, "machine": machine, "rows": rows, "targets": targets,
            "target_scope": "every T" if device == "cuda" else f"CI shapes (T <= {CI_MAX_T})", "worst_ratio": worst,
            "worst_graph_ratio": max(graph_ratios, default=None),
            "met": all(w is None or w <= targets[k] for k, w in worst.items())}


def markdown(res: dict[str, Any]) -> str:
    gen = any("normal_generic_ms" in r for r in res["rows"])
    gr = any("graph_normal_ms" in r for r in res["rows"])
    out = ["| layer | T | pass | normal ms | invariant ms | cost |"
           + (" graph normal ms | graph invariant ms | graph cost |" if gr else "")
           + (" normal (generic kernels) ms | cost vs generic |" if gen else ""),
           "|---|---|---|---|---|---|" + ("---|---|---|" if gr else "") + ("---|---|" if gen else "")]

    def ms(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-"

    for r in res["rows"]:
        line = f"| {r['layer']} | {r['T']} | {r['pass']} | {r['normal_ms']:.3f} | {r['invariant_ms']:.3f} | {r['ratio']:.2f}x |"
        if gr:
            ratio = f"{r['graph_ratio']:.2f}x" if r.get("graph_ratio") else (
                "capture failed" if "graph_normal_error" in r or "graph_invariant_error" in r else "-")
            line += f" {ms(r.get('graph_normal_ms'))} | {ms(r.get('graph_invariant_ms'))} | {ratio} |"
        if gen:
            line += f" {r.get('normal_generic_ms', 0):.3f} | {r.get('ratio_vs_generic', 0):.2f}x |"
        out.append(line)
    errs = [(r["T"], k, r[k]) for r in res["rows"] for k in ("graph_normal_error", "graph_invariant_error") if k in r]
    out += [f"- T={t} {k}: {e}" for t, k, e in errs]
    for r in res["rows"]:
        for mode in ("normal", "invariant"):
            kp = r.get(f"kernels_{mode}")
            if kp:
                ks = ", ".join(f"{n[:40]} {us}" for n, us in kp["kernels"])
                out.append(f"- T={r['T']} {mode}: {kp['launches']} kernels, {kp['total_us']} us device time per forward: {ks}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gpu-t", default="1,8,64,512,4096,32768")
    ap.add_argument("--cpu-t", default="1,3,6,21,29,128,512")
    ap.add_argument("--bwd-max-t", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3, help="CUDA: interleaved rounds per case")
    ap.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph timings")
    ap.add_argument("--no-generic", action="store_true", help="CUDA: skip the kernels='torchtitan' baseline")
    ap.add_argument("--profile-t", default="", help="CUDA: per-kernel device time (torch.profiler) at these T")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(1)
    res = run(a.device, [int(t) for t in a.gpu_t.split(",")], [int(t) for t in a.cpu_t.split(",")], a.bwd_max_t,
              rounds=a.rounds, graphs=not a.no_graphs, generic=not a.no_generic, out=a.out,
              profile_ts=tuple(int(t) for t in a.profile_t.split(",") if t))
    print(markdown(res))
    print(f"worst ratio over {res['target_scope']}: {res['worst_ratio']} (targets {res['targets']}): "
          f"{'met' if res['met'] else 'NOT met'}; worst CUDA-graph forward ratio: {res['worst_graph_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
