"""TP2EP parity on real gloo groups of 2 and 4 ranks (EP = TP = n).

Every case builds a single-device MoE, shards its state dict with
spmd_moe.checkpoint.shard_state_dict onto n ranks, and runs the same tokens through
both. Checked per case: the forward (fp32, relative error <= 1e-6), the gradients of
the input, the router gate, the routed experts (gathered from their shards) and the
shared experts (<= 1e-5), the load-balance counters (exactly the single-device
counts; pads never counted), replicated outputs identical on every rank, and which
dispatcher really ran.

Grid: total T in {0,1,2,3,5,7,64,257} x layout {replicated, sequence} x dispatcher
{all_to_all, all_gather}, with score {softmax, sigmoid} and shared experts {on, off}, plus
skewed routing (every token to one expert; every token to the experts of one rank),
plus dispatcher='auto', plus a slice of it in debug mode (spmd_types placement
tracking on: no false positive, same numbers). Each (T, layout, dispatcher) runs two of the four (score,
shared) pairs, rotating, so every (layout, dispatcher, score, shared) combination is
covered (test_grid_covers_the_acceptance_list asserts it). Each grid runs three ways: autograd (training), then without
autograd under torch.inference_mode and torch.no_grad (the raw torch.distributed
collectives vLLM's path takes).

Gradient semantics of layout 'replicated' (vLLM's, also usable for training): the
output y is Replicate on the axis, so its gradient is Partial -- every rank holds a
summand of dL/dy. Each rank therefore back-propagates (y * g).sum() / n: the n
summands add up to the gradient of the single-device loss (y * g).sum(). The
backward of the token split (R -> V) puts this rank's chunk gradient into zeros and
the column-parallel shared experts give a summand too, so the input gradient is
Partial and is all_reduced before the comparison; so is the router gate's (each rank
routed only its own tokens). Routed-expert and shared-expert weight gradients are
already complete on their owner (each expert's rows arrive from every rank).
In layout 'sequence' the output is Varying: each rank back-propagates the loss of its
own token slice, the input gradient is this rank's slice, and only the replicated
gate's gradient needs the all_reduce.

Everything for one world size runs in ONE spawned group (spawn costs seconds); the
module-scoped fixture caches it and the tests below assert on slices of the results.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import pytest
import torch
import torch.distributed as dist

import spmd_moe
from dist_utils import run_distributed
from spmd_moe import ParallelContext
from tp2ep_util import D, K, S_HID, DispatchSpy, build_pair, make_cfg, rel_err, token_slice, world_pctx

TS = (0, 1, 2, 3, 5, 7, 64, 257)
LAYOUTS = ("replicated", "sequence")
DISPATCHERS = ("all_to_all", "all_gather")
SCORES = ("softmax", "sigmoid")
FWD_TOL = 1e-6
GRAD_TOL = 1e-5


def _cases(world: int) -> list[dict[str, Any]]:
    # Every T x layout x dispatcher, each with two of the four (score, shared) pairs,
    # rotating so that every (layout, dispatcher, score, shared) combination occurs
    # (a covering design: the full product doubles the time for no new code path).
    combos = [(s, sh) for s in SCORES for sh in (False, True)]
    base: list[dict[str, Any]] = []
    for t, T in enumerate(TS):
        for ld, (layout, disp) in enumerate((lo, d) for lo in LAYOUTS for d in DISPATCHERS):
            for j in (0, 2):
                score, shared = combos[(t + ld + j) % 4]
                base.append(dict(T=T, layout=layout, dispatcher=disp, score=score, shared=shared, skew="none"))
    i = 0
    for T in (7, 64):
        for skew in ("one_expert", "one_rank"):
            for layout in LAYOUTS:
                for disp in DISPATCHERS:
                    score, shared = combos[i % 4]
                    i += 1
                    base.append(dict(T=T, layout=layout, dispatcher=disp, score=score, shared=shared, skew=skew))
    for T in (7, 257):
        for layout in LAYOUTS:
            base.append(dict(T=T, layout=layout, dispatcher="auto", score="softmax", shared=True, skew="none"))
    cases = [dict(c, mode="grad") for c in base]
    cases += [dict(c, mode="inference") for c in base]
    cases += [dict(c, mode="no_grad") for c in base if c["T"] in (3, 64) and c["skew"] == "none"]
    # Debug mode (shape/dtype checks, spmd_types placement tracking through the layer):
    # the same results, no false positive, on both layouts and dispatchers.
    cases += [
        dict(c, mode=mode, debug=True)
        for c in base
        if c["T"] in (1, 5, 64) and c["skew"] == "none" and c["dispatcher"] != "auto" and c["score"] == "softmax"
        for mode in ("grad", "inference")
    ]
    for i, c in enumerate(cases):
        c["seed"] = zlib.crc32(repr(sorted((k, v) for k, v in c.items() if k != "mode")).encode()) % 1000
        c["id"] = i
    return cases


def _expected_dispatcher(c: dict[str, Any], n: int) -> str:
    if c["dispatcher"] != "auto":
        return str(c["dispatcher"])
    T = c["T"]
    per_rank = -(-T // n)  # replicated: ceil(T/n) after padding; sequence: the largest slice
    if per_rank > make_cfg().decode_max_tokens:
        return "all_to_all"
    if c["layout"] == "replicated" and c["mode"] != "grad" and T > 0 and not c.get("debug"):
        return "none"  # spmd_moe.replicated_decode: one all-reduce, no dispatcher (H-D)
    return "all_gather"


def _gather_cat(t: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)


def _run_case(c: dict[str, Any], pctx: ParallelContext | None = None) -> dict[str, Any]:
    pctx = pctx or world_pctx()
    grp = pctx.group
    n, rank = pctx.size, pctx.rank
    T, layout, mode = c["T"], c["layout"], c["mode"]
    cfg = make_cfg(
        score_func=c["score"], route_norm=c["score"] == "sigmoid",
        shared_hidden_dim=S_HID if c["shared"] else None,
        load_balance_coeff=1e-3 if c["skew"] != "none" else None,
        dispatcher=c["dispatcher"], padding="pad",
    )
    full, moe = build_pair(cfg, pctx, layout, c["seed"], c["skew"])
    spy = DispatchSpy(moe)
    g = torch.Generator().manual_seed(1000 + c["seed"])
    x = torch.randn(T, D, generator=g)
    gy = torch.randn(T, D, generator=g)

    # Single-device reference (always with autograd).
    x_ref = x.clone().requires_grad_(True)
    y_ref = full(x_ref)
    (y_ref * gy).sum().backward()

    sl = slice(0, T) if layout == "replicated" else token_slice(T, n, rank)
    x_in = x[sl].clone()
    out: dict[str, Any] = {"id": c["id"]}
    if mode == "grad":
        x_in.requires_grad_(True)
        y = moe(x_in)
        # Replicated y: its gradient is Partial -> each rank takes 1/n of the loss.
        scale = n if layout == "replicated" else 1
        ((y * gy[sl]).sum() / scale).backward()
        gx = x_in.grad.detach().clone() if x_in.grad is not None else torch.zeros_like(x_in)
        if layout == "replicated":
            dist.all_reduce(gx, group=grp)  # Partial -> the full input gradient
        gate = _grad(moe.router.gate.weight)
        dist.all_reduce(gate, group=grp)  # each rank routed only its own tokens
        ex = moe.experts
        errs = {
            "grad_x": rel_err(gx, x_ref.grad[sl]),
            "grad_gate": rel_err(gate, full.router.gate.weight.grad),
        }
        for pname in ("w1_EFD", "w2_EDF", "w3_EFD"):
            gathered = _gather_cat(_grad(getattr(ex, pname)), 0, grp)
            errs[f"grad_{pname}"] = rel_err(gathered, getattr(full.experts, pname).grad)
        if moe.shared_experts is not None:
            assert full.shared_experts is not None
            for pname, dim in (("w1", 0), ("w2", 1), ("w3", 0)):
                gathered = _gather_cat(_grad(getattr(moe.shared_experts, pname).weight), dim, grp)
                errs[f"grad_shared_{pname}"] = rel_err(gathered, getattr(full.shared_experts, pname).weight.grad)
        out["grad"] = errs
    else:
        ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
        with ctx:
            y = moe(x_in)
        out["y_requires_grad"] = bool(y.requires_grad)
    out["fwd"] = rel_err(y.detach(), y_ref.detach()[sl])
    out["y_shape"] = tuple(y.shape)
    out["finite"] = bool(torch.isfinite(y).all())
    with torch.no_grad():
        if layout == "replicated" and T > 0:
            # R output: the same bits on every rank.
            everyone = _gather_cat(y.detach().unsqueeze(0), 0, grp)
            out["rep_same"] = bool((everyone == everyone[0]).all())
        counts = moe.global_tokens_per_expert()
    ref_counts = full.tokens_per_expert_E
    out["counts_equal"] = bool(torch.equal(counts.to(torch.float64), ref_counts.to(torch.float64)))
    out["counts_sum"] = float(counts.sum())
    out["used"] = spy.used()
    return out


def _run(c: dict[str, Any]) -> dict[str, Any]:
    if c.get("debug"):
        with spmd_moe.debug():
            return _run_case(c)
    return _run_case(c)


def parity_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = [_run(c) for c in cases]
    return {"results": results, "seconds": time.perf_counter() - t0}


_CACHE: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]], float]] = {}


def _results(world: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    if world not in _CACHE:
        cases = _cases(world)
        t0 = time.perf_counter()
        per_rank = run_distributed(parity_worker, world, cases, timeout=280 if world == 4 else 200, pg_timeout=60)
        wall = time.perf_counter() - t0
        # Rank-major -> case-major: case i's result on every rank.
        rows = [[pr["results"][i] for pr in per_rank] for i in range(len(cases))]
        _CACHE[world] = (cases, [{"rows": r} for r in rows], wall)
        fwd = max(r["fwd"] for pr in per_rank for r in pr["results"])
        grad = max((v for pr in per_rank for r in pr["results"] for v in r.get("grad", {}).values()), default=0.0)
        print(f"world {world}: {len(cases)} cases, wall {wall:.1f} s, in-rank "
              f"{[round(pr['seconds'], 1) for pr in per_rank]} s, max rel err fwd {fwd:.2e} grad {grad:.2e}")
    return _CACHE[world]


def _fail_lines(world: int, select: Any, check: Any) -> list[str]:
    cases, results, _ = _results(world)
    bad = []
    checked = 0
    for c, res in zip(cases, results):
        if not select(c):
            continue
        checked += 1
        for rank, r in enumerate(res["rows"]):
            problem = check(c, r, world)
            if problem:
                bad.append(f"world {world} rank {rank} case {c}: {problem}")
    assert checked > 0, "the selection matched no case"
    return bad


def _check_forward(c: dict[str, Any], r: dict[str, Any], n: int) -> str | None:
    if not r["finite"]:
        return "non-finite output"
    if r["fwd"] > FWD_TOL:
        return f"forward rel err {r['fwd']:.3g} > {FWD_TOL}"
    if c["layout"] == "replicated" and r["y_shape"] != (c["T"], D):
        return f"output shape {r['y_shape']}, expected {(c['T'], D)}"
    if c["layout"] == "replicated" and c["T"] > 0 and not r["rep_same"]:
        return "replicated output differs between ranks"
    if not r["counts_equal"]:
        return "global_tokens_per_expert() != single-device counts"
    if r["counts_sum"] != c["T"] * K:
        return f"counts sum {r['counts_sum']} != T*K={c['T'] * K} (pads counted or tokens lost)"
    want = _expected_dispatcher(c, n)
    if r["used"] != want:
        return f"dispatcher ran: {r['used']}, expected {want}"
    return None


def _check_grad(c: dict[str, Any], r: dict[str, Any], n: int) -> str | None:
    f = _check_forward(c, r, n)
    if f:
        return f
    bad = {k: v for k, v in r["grad"].items() if v > GRAD_TOL}
    if bad:
        return f"gradient rel errs above {GRAD_TOL}: {bad}"
    want = {"grad_x", "grad_gate", "grad_w1_EFD", "grad_w2_EDF", "grad_w3_EFD"}
    if c["shared"]:
        want |= {"grad_shared_w1", "grad_shared_w2", "grad_shared_w3"}
    if set(r["grad"]) != want:
        return f"gradients checked: {sorted(r['grad'])}, expected {sorted(want)}"
    return None


def _check_no_autograd(c: dict[str, Any], r: dict[str, Any], n: int) -> str | None:
    f = _check_forward(c, r, n)
    if f:
        return f
    if r["y_requires_grad"]:
        return "output requires grad without autograd"
    return None


WORLDS = [2, 4]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", WORLDS)
def test_training_parity_forward_and_grads(world: int) -> None:
    """Acceptance 1: every grid case with autograd, both layouts, both dispatchers."""
    bad = _fail_lines(world, lambda c: c["mode"] == "grad", _check_grad)
    assert not bad, "\n".join(bad[:20]) + f"\n({len(bad)} failures)"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_inference_parity(world: int, mode: str) -> None:
    """Acceptance 2: the same without autograd (raw torch.distributed collectives)."""
    bad = _fail_lines(world, lambda c: c["mode"] == mode, _check_no_autograd)
    assert not bad, "\n".join(bad[:20]) + f"\n({len(bad)} failures)"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", WORLDS)
def test_grid_covers_the_acceptance_list(world: int) -> None:
    """The grid really holds every T, layout, dispatcher, score, shared and skew case,
    and each dispatcher really ran on both layouts (DispatchSpy)."""
    cases, results, wall = _results(world)
    grad = [c for c in cases if c["mode"] == "grad"]
    assert {c["T"] for c in grad} == set(TS)
    assert {(c["layout"], c["dispatcher"], c["score"], c["shared"]) for c in grad if c["skew"] == "none" and c["dispatcher"] != "auto"} == {
        (lo, d, s, sh) for lo in LAYOUTS for d in DISPATCHERS for s in SCORES for sh in (False, True)
    }
    assert {c["skew"] for c in grad} == {"none", "one_expert", "one_rank"}
    debug = {(c["layout"], c["dispatcher"], c["mode"]) for c in cases if c.get("debug")}
    assert debug == {(lo, d, m) for lo in LAYOUTS for d in DISPATCHERS for m in ("grad", "inference")}
    ran = {(c["layout"], r["rows"][0]["used"]) for c, r in zip(cases, results)}
    for lo in LAYOUTS:
        for d in DISPATCHERS:
            assert (lo, d) in ran
    print(f"world {world}: {len(cases)} cases in one spawned group, {wall:.1f} s wall")


def test_skewed_routing_really_skews() -> None:
    """The skew biases do what the grid claims (single device, every T of the grid)."""
    from tp2ep_util import skew_bias

    for n in (2, 4):
        for skew in ("one_expert", "one_rank"):
            cfg = make_cfg(load_balance_coeff=1e-3)
            from spmd_moe import MoE

            m = MoE(cfg)
            m.init_states(3)
            b = skew_bias(skew, cfg.num_experts, n)
            assert m.expert_bias_E is not None and b is not None
            m.expert_bias_E.copy_(b)
            x = torch.randn(64, D)
            with torch.no_grad():
                m(x)
            counts = m.tokens_per_expert_E
            if skew == "one_expert":
                assert int(counts[3]) == 64
            else:
                e = cfg.num_experts // n
                assert int(counts[(n - 1) * e:].sum()) == 64 * K
                assert int(counts[: (n - 1) * e].sum()) == 0


# --------------------------------------------------------------------------- sub-mesh
def submesh_worker(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """4 ranks as a (dp=2, tp=2) DeviceMesh: the expert axis is the 'tp' dim, a subgroup
    whose ranks are not the global ones (vLLM with data parallel, torchtitan's EP dim
    inside a larger mesh). Each dp replica gets its own tokens."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    pctx = ParallelContext.from_mesh(mesh, "tp")
    dp = mesh.get_local_rank("dp")
    results = [_run_case(dict(c, seed=c["seed"] + 500 * dp), pctx) for c in cases]
    return {"results": results, "dp": dp, "tp_rank": pctx.rank, "tp_size": pctx.size}


@pytest.mark.timeout(400)
def test_expert_axis_is_a_submesh_dim() -> None:
    cases = [
        dict(T=T, layout=layout, dispatcher=disp, score="sigmoid", shared=True, skew="none", mode=mode, seed=T, id=0)
        for T in (1, 5, 64) for layout in LAYOUTS for disp in DISPATCHERS for mode in ("grad", "inference")
    ]
    per_rank = run_distributed(submesh_worker, 4, cases, timeout=300, pg_timeout=60)
    assert [(r["dp"], r["tp_rank"], r["tp_size"]) for r in per_rank] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    bad = []
    for rank, pr in enumerate(per_rank):
        for c, r in zip(cases, pr["results"]):
            check = _check_grad if c["mode"] == "grad" else _check_no_autograd
            problem = check(c, r, 2)
            if problem:
                bad.append(f"global rank {rank} case {c}: {problem}")
    assert not bad, "\n".join(bad[:20])
