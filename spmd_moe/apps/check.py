"""`spmd-moe check MODULE:FACTORY`: run a user's model on real CPU gloo worlds in debug
mode over adversarial token counts and report every placement / padding error with
its fix (docs/check.md).

The factory contract: ``factory(pctx: ParallelContext[EP]) -> spmd_moe.MoE | CheckTarget``.
``pctx`` is the expert axis of the check's world (a gloo group of 2 or 4 CPU
processes, named 'ep'); build the model on it, initialize its weights deterministically
(every rank must hold the same replicated weights), and return either an
``spmd_moe.MoE`` (its layout and dim are read from it) or a :class:`CheckTarget` that
says how the tokens given to ``module`` sit on the axis.

How a run works: for each world size, one spawned process per rank (gloo, CPU, one
thread), a group of the check's own for its bookkeeping and a separate group for the
model. For each token case every rank builds a fresh model from the factory, runs
forward and backward inside ``spmd_moe.debug()``, and the ranks exchange their
verdicts on the bookkeeping group; a case that failed on some ranks gets the model a
fresh group, so one broken case never poisons the next. Collectives that wait for a
rank that raised end after ``--collective-timeout``; a rank that never returns is
killed after ``--timeout`` and reported with the case it was in.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import re
import socket
import sys
import tempfile
import time
import traceback
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from spmd_moe.apps.progress import Progress, progress
from spmd_moe.moe import LAYOUTS, Layout, MoE
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP

__all__ = ["CheckTarget", "Case", "cases_for", "load_factory", "render", "run_check", "main"]

CaseKind = Literal["run", "probe"]


@dataclass
class CheckTarget:
    """What a factory returns when the module is not a bare ``spmd_moe.MoE``.

    module: the model (or layer); ``module(x)`` is called with this rank's input.
    layout: how that input sits on the expert axis: 'replicated' / 'invariant' (the
        same tokens on every rank; the check feeds identical tokens) or 'sequence'
        (each rank its own slice; the check feeds different, often uneven, slices).
    dim: D of the default input, a [T, D] float tensor (ignored with make_input).
    make_input: optional ``(T, generator) -> input`` for models that take something
        else (token ids, [B, L, D]); must be deterministic in the generator.
    dtype: dtype of the default input.
    backward: run backward too (a scalar made from every float output).
    same_rows: the first output has as many rows (numel / last dim) as the input.
    inference: also run the module with debug mode off under ``torch.inference_mode()``
        (the serving paths, e.g. the replicated layout's one-all-reduce decode) and
        compare its first output with the debug-mode one. None: on for a bare
        ``spmd_moe.MoE`` (deterministic), off otherwise (dropout would differ).
    """

    module: nn.Module
    layout: Layout
    dim: int = 0
    make_input: Callable[[int, torch.Generator], Any] | None = None
    dtype: torch.dtype = torch.float32
    backward: bool = True
    same_rows: bool = True
    inference: bool | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"CheckTarget.layout: expected one of {LAYOUTS}, got {self.layout!r}. Fix: say how "
                "the module's input tokens sit on the expert axis."
            )
        if self.make_input is None and self.dim <= 0:
            raise ValueError(
                f"CheckTarget.dim: expected the model dim D > 0 (the default input is [T, D]), got "
                f"{self.dim}. Fix: pass dim=D, or make_input=(T, generator) -> input."
            )


Factory = Callable[[ParallelContext[EP]], "nn.Module | CheckTarget"]


@dataclass(frozen=True)
class Case:
    """One token case: ``counts[r]`` is rank r's local token count. In the replicated
    layouts every rank holds the same T tokens (counts all equal); ``probe`` cases feed
    a deliberate misuse of the declared layout, which debug mode is expected to stop."""

    id: str
    label: str
    counts: tuple[int, ...]
    kind: CaseKind = "run"


def cases_for(layout: Layout, n: int, decode_max_tokens: int = 16) -> list[Case]:
    """The adversarial token cases for a module in ``layout`` on ``n`` ranks (counts
    that repeat an earlier case are dropped)."""
    out: list[Case] = []
    seen: set[tuple[int, ...]] = set()

    def add(cid: str, label: str, counts: list[int]) -> None:
        key = tuple(counts)
        if key not in seen:
            seen.add(key)
            out.append(Case(cid, label, key))

    prefill = decode_max_tokens + 1  # per rank: above 'auto's decode limit (all-to-all)
    if layout in ("replicated", "invariant"):
        for cid, label, t in (
            ("empty", "T=0: empty batch", 0),
            ("one", "T=1: one token (decode)", 1),
            ("fewer", f"T={n - 1}: fewer tokens than ranks", n - 1),
            ("odd", f"T={2 * n + 1}: odd, not a multiple of {n}", 2 * n + 1),
            ("even", f"T={4 * n}: a multiple of {n} (control)", 4 * n),
            ("prefill", f"T={prefill * n + 1}: prefill size, not a multiple of {n}", prefill * n + 1),
        ):
            add(cid, label, [t] * n)
        if n > 1:  # on one rank every placement is the same thing: nothing to misuse
            out.append(Case("probe", "misuse probe: different tokens on each rank", (4,) * n, "probe"))
    else:
        for cid, label, counts in (
            ("empty", "every rank empty", [0] * n),
            ("one", "one token in the world, on rank 0", [1] + [0] * (n - 1)),
            ("one_last", f"one token in the world, on rank {n - 1}", [0] * (n - 1) + [1]),
            ("fewer", f"{n - 1} tokens: fewer than ranks", [1] * (n - 1) + [0]),
            ("ones", "one token per rank", [1] * n),
            ("odd", "3 tokens per rank (odd, equal)", [3] * n),
            ("uneven", "uneven: 2r+1 tokens on rank r", [2 * r + 1 for r in range(n)]),
            ("uneven_empty", "uneven, rank 0 empty: 3r tokens on rank r", [3 * r for r in range(n)]),
            ("prefill", f"prefill size, uneven: {prefill}+5r tokens on rank r", [prefill + 5 * r for r in range(n)]),
        ):
            add(cid, label, counts)
        if n > 1:
            out.append(Case("probe", "misuse probe: the same tokens on every rank", (3,) * n, "probe"))
    return out


# ----------------------------------------------------------------------------- loading
def load_factory(spec: str) -> Callable[..., Any]:
    """``package.module:name`` or ``path/to/file.py:name`` -> the callable."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(
            f"target {spec!r}: expected MODULE:FACTORY (e.g. examples.working_moe:build or "
            "path/to/model.py:build). Fix: name the module and the factory, separated by ':'."
        )
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise ValueError(f"target {spec!r}: expected a Python file, got no file {path}. Fix: check the path.")
        key = "_spmd_check_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        mod = sys.modules.get(key)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(key, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ValueError(f"target {spec!r}: cannot import {path}. Fix: pass a .py file.")
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[key] = mod
            loader_spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(
            f"target {spec!r}: expected a callable '{attr}' in {mod_name}, got "
            f"{type(fn).__name__ if fn is not None else 'nothing'}. Fix: define "
            f"def {attr}(pctx: ParallelContext[EP]) -> MoE | CheckTarget."
        )
    return fn  # type: ignore[no-any-return]


def _as_target(made: object, spec: str) -> CheckTarget:
    if isinstance(made, CheckTarget):
        return made
    if isinstance(made, MoE):
        return CheckTarget(made, made.layout, made.cfg.dim)
    raise TypeError(
        f"factory {spec}: expected an spmd_moe.MoE or a CheckTarget, got {type(made).__name__}. "
        "Fix: return CheckTarget(module, layout='replicated' | 'invariant' | 'sequence', dim=D) "
        "saying how the module's input tokens sit on the expert axis."
    )


# ----------------------------------------------------------------------------- errors
_LIB_DIRS = (
    str(Path(torch.__file__).parent),
    str(Path(__file__).resolve().parents[1]),  # spmd_moe
    os.path.dirname(os.__file__),  # the standard library
)


def _where(tb: Any) -> str | None:
    """file:line of the innermost frame in the user's code (not torch, spmd_moe, the
    standard library or site-packages); else where the call entered spmd_moe (the
    outermost spmd_moe frame below the check itself)."""
    frames = traceback.extract_tb(tb)
    for fr in reversed(frames):
        f = os.path.abspath(fr.filename)
        if "site-packages" in f or any(f.startswith(d) for d in _LIB_DIRS):
            continue
        return f"{os.path.relpath(f) if not os.path.relpath(f).startswith('..') else f}:{fr.lineno} ({fr.name})"
    lib = str(Path(__file__).resolve().parents[1])
    for fr in frames:
        if os.path.abspath(fr.filename).startswith(lib) and not fr.filename.endswith("apps/check.py"):
            return f"spmd_moe/{os.path.relpath(fr.filename, lib)}:{fr.lineno} ({fr.name})"
    return None


def _error_record(phase: str, e: BaseException) -> dict[str, Any]:
    from spmd_moe.errors import SpmdMoeError

    msg = str(e)
    fix = msg.split("Fix:", 1)[1].strip() if "Fix:" in msg else None
    kind = type(e).__name__
    low = msg.lower()
    if isinstance(e, RuntimeError) and ("timed out" in low or "timeout" in low) and not isinstance(e, SpmdMoeError):
        kind = "CollectiveTimeout"
        fix = ("another rank did not join this collective (see that rank's error in this case); "
               "every rank must call the same collectives in the same order")
    return {
        "phase": phase, "type": kind, "message": msg[:4000], "fix": fix,
        "spmd_moe": isinstance(e, SpmdMoeError), "where": _where(e.__traceback__),
    }


# ----------------------------------------------------------------------------- one rank
def _fingerprint(t: torch.Tensor) -> str:
    b = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(b.view(torch.uint8).numpy().tobytes() if b.numel() else b"").hexdigest()[:16] + str(tuple(t.shape))


def _float_tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _float_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _float_tensors(o)]
    return []


def _rows(t: object) -> int | None:
    if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[-1] > 0:
        return t.numel() // t.shape[-1]
    if isinstance(t, torch.Tensor) and t.ndim >= 1:
        return int(t.shape[0]) if t.ndim == 1 else None
    return None


def _seed(*key: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little")


def _run_case(
    factory: Callable[..., Any], spec: str, pctx: ParallelContext[EP], case: Case, layout: Layout, world: int,
) -> dict[str, Any]:
    """Build, forward, backward, local checks. Never raises."""
    import spmd_moe

    rank = pctx.rank
    rec: dict[str, Any] = {"errors": [], "findings": [], "moe_calls": {}, "moe_before": {}}
    phase = "build"
    hooks: list[Any] = []
    try:
        target = _as_target(factory(pctx), spec)
        if target.layout != layout:
            raise ValueError(
                f"factory {spec}: expected the same layout on every build, got {target.layout!r} after "
                f"{layout!r}. Fix: make the factory deterministic."
            )
        module = target.module
        T = case.counts[rank]
        # The tokens: identical on every rank where the layout says so (and in the
        # sequence probe); this rank's own otherwise (and in the replicated probe).
        same = (layout != "sequence") == (case.kind == "run")
        g = torch.Generator().manual_seed(_seed(spec, world, case.id, None if same else rank))
        phase = "input"
        if target.make_input is not None:
            x = target.make_input(T, g)
        else:
            x = torch.randn(T, target.dim, generator=g, dtype=torch.float64).to(target.dtype)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and target.backward:
            x.requires_grad_(True)
        moes = {name: m for name, m in module.named_modules() if isinstance(m, MoE)}
        for name, m in moes.items():
            rec["moe_calls"][name] = []
            rec["moe_before"][name] = m.tokens_per_expert_E.detach().clone()

            def pre(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                rec["moe_calls"][_name].append(_rows(args[0]) if args else None)

            hooks.append(m.register_forward_pre_hook(pre))
        phase = "forward"
        with spmd_moe.debug():
            out = module(x)
            outs = _float_tensors(out)
            if target.backward:
                phase = "backward"
                # A fixed random cotangent: the same on every rank where the output is
                # the same on every rank (one loss), this rank's own for token slices.
                loss = torch.zeros((), dtype=torch.float64)
                for i, t in enumerate(outs):
                    if t.requires_grad:
                        gg = torch.Generator().manual_seed(_seed(spec, world, case.id, i, None if layout != "sequence" else rank))
                        w = torch.randn(t.shape, generator=gg, dtype=torch.float64)
                        loss = loss + (t.double() * w).sum()
                if loss.requires_grad:
                    torch.autograd.backward(loss)
        for h in hooks:
            h.remove()
        hooks.clear()
        phase = "post"
        first = outs[0] if outs else None
        rec["out_fp"] = _fingerprint(first) if first is not None else None
        xg = x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None
        rec["xgrad_fp"] = _fingerprint(xg) if xg is not None else None
        bad = [f"output {i}" for i, t in enumerate(outs) if not bool(torch.isfinite(t).all())]
        if xg is not None and not bool(torch.isfinite(xg).all()):
            bad.append("input gradient")
        bad += [f"gradient of {n}" for n, p in module.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            rec["findings"].append({
                "phase": "post", "type": "NonFinite", "message": f"NaN/inf in {', '.join(bad[:5])}",
                "fix": "find the op that produced them (debug mode checks the MoE's router input only)",
                "spmd_moe": False, "where": None,
            })
        if target.same_rows and first is not None and _rows(x) is not None and _rows(first) != _rows(x):
            rec["findings"].append({
                "phase": "post", "type": "ShapeMismatch",
                "message": f"output rows: expected {_rows(x)} (the input's rows on rank {rank}), got {_rows(first)} "
                           f"(shape {tuple(first.shape)})",
                "fix": "return one output row per input token on every rank (or CheckTarget(same_rows=False))",
                "spmd_moe": False, "where": None,
            })
        rec["module"] = module
        if target.inference if target.inference is not None else isinstance(module, MoE):
            rec["inference"] = (x.detach() if isinstance(x, torch.Tensor) else x, first.detach() if first is not None else None)
    except BaseException as e:  # noqa: BLE001 - reported, never raised
        for h in hooks:
            h.remove()
        rec["errors"].append(_error_record(phase, e))
    return rec


def _accounting(rec: dict[str, Any], everyone: list[dict[str, Any]], layout: Layout) -> list[dict[str, Any]]:
    """Token accounting of every spmd_moe.MoE in the module: the counters summed over
    the axis must hold top_k x the tokens that entered the layer (pads never counted;
    every token once, never once per rank). One all-reduce per layer on its group."""
    import torch.distributed as dist

    module = rec.get("module")
    found: list[dict[str, Any]] = []
    if module is None:
        return found
    for name, m in module.named_modules():
        if not isinstance(m, MoE) or name not in rec["moe_calls"]:
            continue
        calls = [e["moe_calls"].get(name, []) for e in everyone]
        if len({len(c) for c in calls}) != 1 or not calls[0] or any(r is None for c in calls for r in c):
            continue  # called around __call__, or differently per rank: nothing to compare
        delta_E = (m.tokens_per_expert_E.detach().double() - rec["moe_before"][name].double()).contiguous()
        if m.pctx.group is not None and m.pctx.size > 1:
            dist.all_reduce(delta_E, group=m.pctx.group)
        if not m.training and type(m) is not MoE:
            continue  # adapters (torchtitan's) count in training mode only
        per_call = []
        for i in range(len(calls[0])):
            rows = [c[i] for c in calls]
            per_call.append(sum(rows) if m.layout == "sequence" else rows[0])
        expected = m.cfg.top_k * sum(per_call)
        got = float(delta_E.sum())
        if got != expected:
            times = f" ({got / expected:g} x)" if expected else ""
            found.append({
                "phase": "post", "type": "TokenAccounting",
                "message": f"{name}: tokens_per_expert_E summed over axis '{m.pctx.name}' (size {m.pctx.size}): "
                           f"expected top_k x tokens = {m.cfg.top_k} x {sum(per_call)} = {expected}, got {got:g}{times}",
                "fix": "each token must reach the layer on exactly one rank (sequence layout) or on every rank "
                       "identically (replicated layouts); a count of n x means a split that never happened "
                       "(torchtitan #3622)",
                "spmd_moe": False, "where": None,
            })
    return found


def _inference_pass(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Debug mode off, torch.inference_mode(): the serving paths. Their first output
    must match the debug-mode one. Tolerance: 1e-5 (fp32/fp64) or 2e-2 (bf16/fp16) of the
    output's largest magnitude; the library makes most of these paths bitwise equal, but
    not all (an all-reduce over more than 2 ranks sums in the backend's order), while a
    path that drops or doubles a term is off by O(1)."""
    import spmd_moe

    x, ref = rec["inference"]
    module = rec["module"]
    try:
        with torch.inference_mode(), spmd_moe.debug(False):
            outs = _float_tensors(module(x))
    except BaseException as e:  # noqa: BLE001
        return [_error_record("serving", e)]
    if ref is None or not outs:
        return []
    got = outs[0]
    if got.shape != ref.shape:
        return [{"phase": "serving", "type": "ServingPathDiffers", "spmd_moe": False, "where": None,
                 "message": f"first output with debug mode off under inference_mode: expected shape {tuple(ref.shape)} "
                            f"(the debug-mode output's), got {tuple(got.shape)}",
                 "fix": "the serving path and the checked path must compute the same thing"}]
    if ref.numel() == 0:
        return []
    diff = float((got.double() - ref.double()).abs().max())
    scale = max(float(ref.double().abs().max()), 1e-30)
    tol = 1e-5 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    rec["serving_maxrel"] = diff / scale
    if diff > tol * scale:
        return [{"phase": "serving", "type": "ServingPathDiffers", "spmd_moe": False, "where": None,
                 "message": f"first output with debug mode off under inference_mode vs the debug-mode output: expected "
                            f"max |diff| <= {tol:g} x max |output| = {tol * scale:.3g}, got {diff:.3g} "
                            f"({diff / scale:.3g} relative)",
                 "fix": "the serving path (no autograd, debug off) computes something else than the checked path: "
                        "compare them on this token count"}]
    return []


def _rank_main(
    rank: int, world: int, port: int, outdir: str, specs: list[str], coll_timeout: float, sys_path: list[str],
    only: list[str] | None = None,
) -> None:
    import torch.distributed as dist

    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    import warnings

    # Whatever the model prints goes to stderr: stdout is the report's (--json).
    sys.stdout.flush()
    os.dup2(2, 1)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    log = open(os.path.join(outdir, f"rank{rank}.jsonl"), "a", buffering=1)

    def emit(obj: dict[str, Any]) -> None:
        log.write(json.dumps(obj, default=str) + "\n")

    ctrl_timeout = datetime.timedelta(seconds=2 * coll_timeout + 60)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=ctrl_timeout)
        ctrl = dist.new_group(backend="gloo", timeout=ctrl_timeout)

        def model_group() -> Any:
            return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=coll_timeout))

        pctx = ParallelContext.from_group(model_group(), "ep")
    except BaseException as e:  # noqa: BLE001
        emit({"event": "fatal", "rank": rank, "error": _error_record("init", e)})
        log.close()
        os._exit(0)

    def gather(obj: Any) -> list[Any]:
        got: list[Any] = [None] * world
        try:
            dist.all_gather_object(got, obj, group=ctrl)
        except BaseException as e:  # noqa: BLE001 - a peer died: nothing more can run
            emit({"event": "fatal", "rank": rank, "spec": current[0], "error": _error_record("exchange", e)})
            log.close()
            os._exit(0)
        return got

    current: list[str | None] = [None]
    for spec in specs:
        current[0] = spec
        # The first build: the layout and the case list (the same on every rank).
        info: dict[str, Any] = {}
        try:
            factory = load_factory(spec)
            t0 = time.monotonic()
            target = _as_target(factory(pctx), spec)
            dmax = max((m.cfg.decode_max_tokens for m in target.module.modules() if isinstance(m, MoE)), default=16)
            info = {"layout": target.layout, "dmax": dmax, "build_s": time.monotonic() - t0,
                    "moe_layers": sum(1 for m in target.module.modules() if isinstance(m, MoE))}
            del target
        except BaseException as e:  # noqa: BLE001
            info = {"error": _error_record("build", e)}
        infos = gather(info)
        bad = [(r, i) for r, i in enumerate(infos) if "error" in i]
        layouts = {i.get("layout") for i in infos if "error" not in i}
        if bad or len(layouts) != 1:
            err = bad[0][1]["error"] if bad else {
                "phase": "build", "type": "RanksDisagree", "spmd_moe": False, "where": None,
                "message": f"layout per rank: {[i.get('layout') for i in infos]}",
                "fix": "the factory must build the same model on every rank"}
            emit({"event": "target", "spec": spec, "rank": rank, "error": err, "ranks": [r for r, _ in bad] or list(range(world))})
            pctx = ParallelContext.from_group(model_group(), "ep")
            continue
        layout: Layout = infos[0]["layout"]
        cases = [c for c in cases_for(layout, world, int(infos[0]["dmax"])) if only is None or c.id in only]
        emit({"event": "target", "spec": spec, "rank": rank, "layout": layout, "moe_layers": info["moe_layers"],
              "cases": [dataclasses.asdict(c) for c in cases], "build_s": info["build_s"]})
        for case in cases:
            emit({"event": "start", "spec": spec, "case": case.id, "rank": rank})
            t0 = time.monotonic()
            rec = _run_case(factory, spec, pctx, case, layout, world)
            secs = time.monotonic() - t0
            # This rank's own verdict first: it survives a peer that never comes back.
            emit({"event": "ran", "spec": spec, "case": case.id, "rank": rank, "seconds": secs, "errors": rec["errors"]})
            public = {k: rec.get(k) for k in ("errors", "findings", "out_fp", "xgrad_fp", "moe_calls")}
            everyone = gather(public)
            failed = [r for r, e in enumerate(everyone) if e["errors"]]
            findings = list(rec["findings"])
            if not failed:
                # Cross-rank checks, on the verdicts every rank now holds.
                if layout in ("replicated", "invariant") and case.kind == "run":
                    fps = [e["out_fp"] for e in everyone]
                    if len(set(fps)) > 1:
                        findings.append({
                            "phase": "post", "type": "OutputDiffers", "spmd_moe": False, "where": None,
                            "message": f"output of a '{layout}' module: expected the same bits on every rank, got "
                                       f"{len(set(fps))} different outputs over {world} ranks",
                            "fix": "the output of a replicated layout must be gathered (all_gather) before it leaves the model"})
                    gps = [e["xgrad_fp"] for e in everyone]
                    if layout == "invariant" and None not in gps and len(set(gps)) > 1:
                        findings.append({
                            "phase": "post", "type": "GradientDiffers", "spmd_moe": False, "where": None,
                            "message": "input gradient of an 'invariant' module: expected the complete gradient, the "
                                       f"same on every rank, got {len(set(gps))} different ones over {world} ranks",
                            "fix": "enter the layer with invariant_to_replicate (its backward sums the gradient), or "
                                   "declare the layout 'replicated' (Partial input gradient)"})
                if case.kind == "run":
                    try:
                        findings += _accounting(rec, everyone, layout)
                    except BaseException as e:  # noqa: BLE001
                        findings.append(_error_record("post", e))
                    if rec.get("inference") is not None:
                        found = _inference_pass(rec)
                        findings += found
                        # A rank whose serving pass raised may have left the others in
                        # a collective: agree on it, and refresh the group below.
                        if any(gather(any(f["type"] != "ServingPathDiffers" for f in found))):
                            failed = [r for r in range(world)]
            emit({"event": "case", "spec": spec, "case": case.id, "kind": case.kind, "rank": rank, "seconds": secs,
                  "errors": rec["errors"], "findings": findings, "failed_ranks": failed,
                  "serving_maxrel": rec.get("serving_maxrel")})
            if failed:
                # Some rank raised: collectives of this case may be half-done on the
                # model's group. The next case gets a fresh one.
                pctx = ParallelContext.from_group(model_group(), "ep")
            rec.clear()
    emit({"event": "done", "rank": rank})
    log.close()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)


# ----------------------------------------------------------------------------- parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def _run_world(specs: list[str], world: int, timeout: float, coll_timeout: float, p: Progress,
               only: list[str] | None = None) -> tuple[list[list[dict[str, Any]]], list[int], float]:
    """Spawn the world; return every rank's events, the ranks killed, the wall time.
    Progress: one step per case rank 0 finished (its verdict as rank 0 saw it)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    t0 = time.monotonic()
    p.status(f"world {world}: starting {world} ranks (gloo, CPU)")
    with tempfile.TemporaryDirectory(prefix="spmd_check_") as outdir:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, outdir, specs, coll_timeout, list(sys.path), only))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        deadline = t0 + timeout
        seen = 0

        def report_progress() -> None:
            nonlocal seen
            ev = _read_jsonl(os.path.join(outdir, "rank0.jsonl"))
            for e in ev[seen:]:
                if e.get("event") == "target":
                    what = f"layout {e['layout']}, {len(e['cases'])} cases" if "error" not in e else f"ERROR {e['error']['type']}"
                    p.status(f"world {world}: {_short_spec(e['spec'])} built ({what})")
                elif e.get("event") == "case":
                    verdict = "ok" if not (e["errors"] or e["findings"]) else ",".join(
                        sorted({x["type"] for x in e["errors"] + e["findings"]}))
                    if e.get("kind") == "probe":
                        verdict = f"misuse caught ({verdict})" if e["errors"] else "misuse NOT caught"
                    p.step(f"world {world}: {_short_spec(e['spec'])} {e['case']}: {verdict}")
            seen = len(ev)

        died: dict[int, int] = {}
        while any(proc.is_alive() for proc in procs) and time.monotonic() < deadline:
            time.sleep(0.25)
            report_progress()
            # A rank that exits abnormally (a crash, os._exit, a signal) leaves its peers
            # waiting: stop the world now rather than after the timeouts.
            died = {r: int(proc.exitcode) for r, proc in enumerate(procs) if proc.exitcode not in (None, 0)}
            if died:
                p.log(f"world {world}: rank(s) {sorted(died)} exited with code(s) {sorted(set(died.values()))}: "
                      "stopping the others")
                break
        report_progress()
        killed = [r for r, proc in enumerate(procs) if proc.is_alive()]
        if killed and not died:
            p.log(f"world {world}: ranks {killed} still running after {timeout:g} s: killed")
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        events = [_read_jsonl(os.path.join(outdir, f"rank{r}.jsonl")) for r in range(world)]
        for r, code in died.items():
            events[r].append({"event": "died", "rank": r, "exitcode": code})
    return events, killed, time.monotonic() - t0


def _merge_errors(per_rank: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Identical errors of several ranks -> one entry listing the ranks."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r, e in per_rank:
        key = (e["phase"], e["type"], e["message"])
        if key in merged:
            merged[key]["ranks"].append(r)
        else:
            merged[key] = {**e, "ranks": [r]}
    return list(merged.values())


def _world_report(specs: list[str], world: int, events: list[list[dict[str, Any]]], killed: list[int], timeout: float) -> list[dict[str, Any]]:
    """Per target: its layout and per-case verdicts at this world size."""
    targets: list[dict[str, Any]] = []
    for spec in specs:
        t_ev = [[e for e in ev if e.get("spec") == spec] for ev in events]
        heads = [next((e for e in ev if e.get("event") == "target"), None) for ev in t_ev]
        tgt: dict[str, Any] = {"target": spec, "world": world, "layout": None, "cases": [], "errors": []}
        fatal = [(r, e["error"]) for r, ev in enumerate(events) for e in ev
                 if e.get("event") == "fatal" and e.get("spec") in (None, spec)]
        if fatal:
            tgt["errors"] = _merge_errors(fatal)
        head = next((h for h in heads if h is not None), None)
        if head is None:
            if not fatal:
                tgt["errors"] = [{"phase": "build", "type": "Hang" if killed else "NoResult", "ranks": killed or list(range(world)),
                                  "message": f"no rank finished building the model within {timeout:g} s", "fix": None,
                                  "spmd_moe": False, "where": None}]
            targets.append(tgt)
            continue
        if "error" in head:
            tgt["errors"] = [{**head["error"], "ranks": head.get("ranks", [])}]
            targets.append(tgt)
            continue
        tgt["layout"] = head["layout"]
        tgt["moe_layers"] = head.get("moe_layers")
        for c in head["cases"]:
            row: dict[str, Any] = {"case": c["id"], "label": c["label"], "counts": c["counts"], "kind": c["kind"]}
            def first(kind: str, ev: list[dict[str, Any]]) -> dict[str, Any] | None:
                return next((e for e in ev if e.get("event") == kind and e["case"] == c["id"]), None)

            # 'case': the verdict after the ranks' exchange; 'ran': the rank's own, written
            # before it (all a rank leaves when a peer never returns); 'start' only: hung.
            done = [first("case", ev) or first("ran", ev) for ev in t_ev]
            started = [first("start", ev) is not None for ev in t_ev]
            errs = [(r, e) for r, d in enumerate(done) if d for e in d["errors"]]
            finds = [(r, e) for r, d in enumerate(done) if d for e in d.get("findings", [])]
            hung = [r for r in range(world) if started[r] and done[r] is None]
            died = {e["rank"]: e["exitcode"] for ev in events for e in ev if e.get("event") == "died"}
            for r in hung:
                if r in died:
                    errs.append((r, {"phase": "run", "type": "RankDied", "message": f"rank {r} exited with code "
                                     f"{died[r]} during this case", "fix": "see the rank's output above (a crash, "
                                     "a signal, sys.exit/os._exit in the model)", "spmd_moe": False, "where": None}))
                elif died:
                    errs.append((r, {"phase": "run", "type": "Aborted", "message": f"rank {r} was stopped after rank(s) "
                                     f"{sorted(died)} exited", "fix": None, "spmd_moe": False, "where": None}))
                else:
                    errs.append((r, {"phase": "run", "type": "Hang", "message": f"rank {r} did not finish this case "
                                     f"within the check's timeout ({timeout:g} s) and was killed", "fix": "a rank stuck "
                                     "outside any collective (a loop, a wait on something else, a deadlock); the "
                                     "collectives of the model end after --collective-timeout", "spmd_moe": False,
                                     "where": None}))
            row["errors"] = _merge_errors(errs)
            row["findings"] = _merge_errors(finds)
            row["seconds"] = max((d["seconds"] for d in done if d), default=None)
            served = [d["serving_maxrel"] for d in done if d and d.get("serving_maxrel") is not None]
            if served:
                row["serving_maxrel"] = max(served)  # debug-off inference vs debug-mode output
            if not any(started):
                row["status"] = "not run"
            elif c["kind"] == "probe":
                caught = [e for e in row["errors"] if e.get("spmd_moe")]
                if caught and not hung:
                    row["status"] = "ok"
                    row["note"] = "the misuse was stopped: " + caught[0]["type"]
                    row["caught"], row["errors"] = row["errors"], []
                else:
                    row["status"] = "warn" if not row["errors"] else "fail"
                    if not row["errors"]:
                        row["note"] = (f"the module accepted a misuse of layout '{head['layout']}' without an error: "
                                       "its input placement is not verified (is the declared layout the one the model "
                                       "states on its input?)")
            else:
                row["status"] = "fail" if row["errors"] or row["findings"] else "ok"
            tgt["cases"].append(row)
        targets.append(tgt)
    return targets


def run_check(specs: list[str], worlds: list[int], *, timeout: float = 300.0, coll_timeout: float = 30.0,
              quiet: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Run every target on every world size (``only``: these case ids); the report
    (see docs/check.md)."""
    report: dict[str, Any] = {"targets": specs, "worlds": worlds, "runs": [],
                              "settings": {"timeout_s": timeout, "collective_timeout_s": coll_timeout, "debug": True,
                                           "cases": only}}
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open(os.devnull, "w")) if quiet else None
        p = stack.enter_context(progress("check", unit="case", stream=stream))
        for world in worlds:
            events, killed, wall = _run_world(specs, world, timeout, coll_timeout, p, only)
            for t in _world_report(specs, world, events, killed, timeout):
                t["wall_s"] = round(wall, 2)
                t["killed_ranks"] = killed
                report["runs"].append(t)
                n_ok = sum(c["status"] == "ok" for c in t["cases"])
                p.record(f"world {world} {_short_spec(t['target'])}",
                         f"{n_ok}/{len(t['cases'])} ok" + (f", {len(t['errors'])} target errors" if t["errors"] else "")
                         + f" ({wall:.1f} s for the world)")
    cases = [c for t in report["runs"] for c in t["cases"]]
    target_errors = sum(1 for t in report["runs"] if t["errors"])
    fixes: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for t in report["runs"]:
        for c in [{"case": "(build)", "errors": t["errors"], "findings": []}] + t["cases"]:
            for e in c["errors"] + c["findings"]:
                if e.get("fix"):
                    # One entry per fix up to its numbers (T=5 and T=9 get the same advice).
                    k = (e["type"], re.sub(r"\d+", "#", e["fix"]), e.get("where"))
                    fixes.setdefault(k, {"type": e["type"], "fix": e["fix"], "where": e.get("where"), "cases": []})
                    fixes[k]["cases"].append(f"{t['target']} world {t['world']} {c['case']}")
    report["fixes"] = list(fixes.values())
    report["summary"] = {
        "cases": len(cases),
        "ok": sum(c["status"] == "ok" for c in cases),
        "failed": sum(c["status"] == "fail" for c in cases),
        "warnings": sum(c["status"] == "warn" for c in cases),
        "not_run": sum(c["status"] == "not run" for c in cases),
        "target_errors": target_errors,
        "distinct_fixes": len(fixes),
    }
    s = report["summary"]
    report["ok"] = s["failed"] == 0 and s["not_run"] == 0 and target_errors == 0 and s["cases"] > 0
    return report


# ----------------------------------------------------------------------------- output
def _short(msg: str, width: int = 100000) -> str:
    return msg if len(msg) <= width else msg[: width - 3] + "..."


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    w = lines.append
    for t in report["runs"]:
        head = f"== {t['target']}  world {t['world']}  layout {t['layout'] or '?'}"
        w(head)
        for e in t["errors"]:
            w(f"  ERROR ({e['phase']}, ranks {e['ranks']}): {e['type']}: {_short(e['message'].split('Fix:')[0].strip())}")
            if e.get("fix"):
                w(f"    fix: {e['fix']}")
            if e.get("where"):
                w(f"    at: {e['where']}")
        for c in t["cases"]:
            if c["status"] in ("ok",):
                continue
            w(f"  {c['status'].upper()} case '{c['case']}' ({c['label']}; tokens per rank {c['counts']})")
            for e in c["errors"] + c["findings"]:
                w(f"    {e['type']} ({e['phase']}, ranks {e['ranks']}): {e['message'].split('Fix:')[0].strip()}")
                if e.get("fix"):
                    w(f"      fix: {e['fix']}")
                if e.get("where"):
                    w(f"      at: {e['where']}")
            if c.get("note"):
                w(f"    {c['note']}")
    # The summary table: one row per (target, case), one column per world.
    w("")
    w("summary (debug mode on; forward + backward):")
    worlds = report["worlds"]
    rows: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for t in report["runs"]:
        if not t["cases"]:
            rows.setdefault((t["target"], "(build)"), {})[t["world"]] = {"status": "fail", "errors": t["errors"], "findings": [], "label": "", "counts": []}
        for c in t["cases"]:
            rows.setdefault((t["target"], c["case"]), {})[t["world"]] = c
    hdr = ["target", "case", "layout", f"tokens per rank (world {worlds[-1]})"] + [f"world {n}" for n in worlds]
    table: list[list[str]] = []
    layouts = {(t["target"], t["world"]): t["layout"] or "?" for t in report["runs"]}
    for (spec, cid), per in rows.items():
        last = per.get(worlds[-1]) or next(iter(per.values()))
        counts = last.get("counts") or []
        shown = "" if not counts else str(counts[0]) + " each" if len(set(counts)) == 1 else ",".join(map(str, counts))
        cells = [_short_spec(spec), cid,
                 layouts.get((spec, worlds[-1]), layouts.get((spec, worlds[0]), "?")), shown]
        for n in worlds:
            c = per.get(n)
            if c is None:
                cells.append("-")
                continue
            errs = c["errors"] + c["findings"]
            word = {"ok": "ok", "fail": "FAIL", "warn": "warn", "not run": "not run"}[c["status"]]
            if errs:
                word += " " + ",".join(sorted({e["type"] for e in errs}))
            if c.get("caught"):
                word += " (caught " + ",".join(sorted({e["type"] for e in c["caught"]})) + ")"
            cells.append(word)
        table.append(cells)
    widths = [max(len(r[i]) for r in [hdr] + table) for i in range(len(hdr))]
    w("  " + "  ".join(h.ljust(widths[i]) for i, h in enumerate(hdr)))
    w("  " + "  ".join("-" * widths[i] for i in range(len(hdr))))
    for r in table:
        w("  " + "  ".join(x.ljust(widths[i]) for i, x in enumerate(r)))
    s = report["summary"]
    w("")
    w(f"{s['cases']} cases: {s['ok']} ok, {s['failed']} failed, {s['warnings']} warnings, {s['not_run']} not run; "
      f"{s['target_errors']} target errors; {s['distinct_fixes']} distinct fixes")
    for f in report["fixes"]:
        w(f"  fix [{f['type']}, {len(f['cases'])} cases, e.g.]: {f['fix']}" + (f"  (at {f['where']})" if f.get("where") else ""))
    w("RESULT: " + ("PASS" if report["ok"] else "FAIL"))
    return "\n".join(lines)


def _short_spec(spec: str) -> str:
    """examples/broken_moe.py:f or a.b.broken_moe:f -> broken_moe:f"""
    mod, _, fn = spec.rpartition(":")
    base = os.path.basename(mod)
    base = base[:-3] if base.endswith(".py") else base.rsplit(".", 1)[-1]
    return f"{base}:{fn}"


# ----------------------------------------------------------------------------- CLI
def main(args: argparse.Namespace) -> int:
    try:
        worlds = [int(x) for x in str(args.worlds).split(",") if x.strip()]
        if not worlds or min(worlds) < 1:
            raise ValueError(f"--worlds: expected positive sizes like 2,4, got {args.worlds!r}")
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)  # MODULE importable from where the command runs, as with python -m
        only = [c.strip() for c in args.cases.split(",") if c.strip()] if getattr(args, "cases", None) else None
        known = {c.id for lay in LAYOUTS for c in cases_for(lay, 4)}
        if only is not None and (not only or set(only) - known):
            raise ValueError(f"--cases: expected some of {sorted(known)}, got {args.cases!r}. Fix: name known case ids.")
        for spec in args.targets:
            load_factory(spec)  # fail fast, in this process, on a target that cannot be imported
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        if args.json:
            print(json.dumps({"ok": False, "error": msg, "where": _where(e.__traceback__)}))
        else:
            print(f"spmd-moe check: {msg}", file=sys.stderr)
        return 2
    report = run_check(list(args.targets), worlds, timeout=args.timeout, coll_timeout=args.collective_timeout,
                       quiet=args.quiet, only=only)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from spmd_moe.apps.check_args import add_arguments

    ap = argparse.ArgumentParser(prog="spmd-moe check")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
