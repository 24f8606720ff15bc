"""Debug mode verifies stated placements from the values; it never assigns them.

The misuses of issue 10, each with plain (untracked) tensors on a real gloo group and
debug mode on, must end in an SpmdMoeError whose message names the tensor, the axis
and its size, expected vs actual, and the fix:

* the 'sequence' layout fed the same token(s) on every rank (torchtitan #3622: a split
  that never happened) -- without the check it counts every token once per rank;
* the 'replicated' layout fed different tokens per rank;
* the public TopKRouter fed replicated tokens;
* call history: a tensor passed to one layout does not make a later correct call with
  it fail, and carries no spmd_types mark after the debug block;
* a replicated parameter (the gate weight) that differs on one rank.

Controls: a correct call in each layout passes with debug on and computes the same bits
as with debug off; debug off runs no check at all (no exchange). Partial is verified by
shape agreement only (its local values are any summands). A rank that never joins the
checksum exchange ends in the group's timeout as a DistributedError.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import spmd_moe as sm
from spmd_moe.checking import fingerprint
from tests.dist_utils import run_distributed, run_ranks

LAYOUTS = ("replicated", "invariant", "sequence")


def _moe(layout: str, *, shared: bool = True) -> Any:
    import torch.distributed as dist

    cfg = sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, padding="pad",
                       shared_hidden_dim=8 if shared else None, load_balance_coeff=1e-3)
    pctx = sm.ParallelContext.from_group(dist.group.WORLD, "ep") if dist.is_initialized() else sm.ParallelContext.single()
    moe = sm.MoE(cfg, pctx, layout=layout)  # type: ignore[call-overload]
    moe.init_states(seed=0)
    return moe


def _catch(fn: Any) -> dict[str, Any]:
    try:
        out = fn()
        return {"raised": None, "out": out}
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return {"raised": type(e).__name__, "spmd_moe": isinstance(e, sm.SpmdMoeError), "msg": str(e)}


def _tokens(seed: int, T: int = 4) -> torch.Tensor:
    return torch.randn(T, 16, generator=torch.Generator().manual_seed(seed))


def _misuse_cases(rank: int, world: int) -> dict[str, Any]:
    import spmd_types as spmd

    res: dict[str, Any] = {}
    # -- #3622: the same single token on every rank in the 'sequence' layout.
    same_1 = _tokens(0, T=1)
    moe = _moe("sequence")
    with sm.debug():
        res["seq_same"] = _catch(lambda: moe(same_1))
    moe = _moe("sequence")
    with sm.debug(False), torch.no_grad():
        moe(same_1)
        res["seq_same_off_counts"] = float(moe.global_tokens_per_expert().sum())

    # -- the 'replicated' (and 'invariant') layout fed different tokens per rank.
    mine = _tokens(100 + rank)
    for layout in ("replicated", "invariant"):
        moe = _moe(layout)
        with sm.debug():
            res[f"{layout}_differ"] = _catch(lambda: moe(mine))
        with sm.debug(False), torch.no_grad():
            res[f"{layout}_differ_off"] = _catch(lambda: moe(mine))["raised"]

    # -- the public router fed replicated tokens.
    moe = _moe("sequence")
    same_4 = _tokens(7)
    with sm.debug():
        res["router_same"] = _catch(lambda: moe.router(same_4))
    with sm.debug(False), torch.no_grad():
        res["router_same_off"] = _catch(lambda: moe.router(same_4))["raised"]

    # -- a replicated parameter that differs on one rank (one ulp of one entry).
    moe = _moe("replicated")
    if rank == world - 1:
        with torch.no_grad():
            w = moe.router.gate.weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
    with sm.debug():
        res["gate_differs"] = _catch(lambda: moe(_tokens(5)))

    # -- only the last rank's replicated input differs (world 4: rank 3 of 4).
    x = _tokens(11)
    if rank == world - 1:
        x = x.clone()
        x[-1, -1] += 1.0
    moe = _moe("replicated")
    with sm.debug():
        res["last_rank_differs"] = _catch(lambda: moe(x))
    res["marked_after"] = [spmd.has_local_type(t) for t in (same_1, mine, same_4, x)]
    return res


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def misuse(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world = int(request.param)
    return world, run_distributed(_misuse_cases, world, timeout=300)


def _assert_names(c: dict[str, Any], tensor: str, world: int, expected: str, actual: str, fix: str) -> None:
    assert c["raised"] == "PlacementError" and c["spmd_moe"], c
    msg = c["msg"]
    assert tensor in msg, msg
    assert f"on axis 'ep' (size {world})" in msg, msg
    assert f"expected placement {expected}" in msg, msg
    assert actual in msg, msg
    assert "Fix:" in msg and fix in msg.split("Fix:", 1)[1], msg


def test_sequence_layout_same_token_everywhere_is_rejected(misuse: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = misuse
    for r in ranks:
        _assert_names(r["seq_same"], "MoE.forward_sequence(x_TD)", world, "V",
                      "likely R (Replicate)", "give each rank its own slice of the tokens")
        assert "layout 'replicated'" in r["seq_same"]["msg"]  # the other way out is offered
        # What the check prevents: without it, one token counted once per rank.
        assert r["seq_same_off_counts"] == 2.0 * world  # top_k=2 per token, world ranks


def test_replicated_layouts_different_tokens_are_rejected(misuse: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = misuse
    for r in ranks:
        _assert_names(r["replicated_differ"], "moe: x_TD", world, "R",
                      "differs across ranks: Varying", "use layout 'sequence'")
        _assert_names(r["invariant_differ"], "moe: x_TD", world, "I",
                      "differs across ranks: Varying", "use layout 'sequence'")
        assert f"ranks {list(range(1, world))} hold other values" in r["replicated_differ"]["msg"]
        # Without debug mode the layer runs (and returns wrong outputs).
        assert r["replicated_differ_off"] is None and r["invariant_differ_off"] is None


def test_public_router_replicated_tokens_are_rejected(misuse: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = misuse
    for r in ranks:
        _assert_names(r["router_same"], "TopKRouter.forward(x_TD)", world, "V",
                      "likely R (Replicate)", "split_tokens")
        assert r["router_same_off"] is None


def test_replicated_parameter_differing_on_one_rank_is_rejected(misuse: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = misuse
    for r in ranks:  # every rank raises (no rank left waiting), naming the last one
        _assert_names(r["gate_differs"], "router.gate.weight", world, "R",
                      "differs across ranks: Varying", "find where they diverged")
        assert f"ranks [{world - 1}] hold other values" in r["gate_differs"]["msg"]


def test_one_rank_out_of_many_differing_is_named(misuse: tuple[int, list[dict[str, Any]]]) -> None:
    world, ranks = misuse
    for r in ranks:
        c = r["last_rank_differs"]
        assert c["raised"] == "PlacementError", c
        assert f"ranks [{world - 1}] hold other values than rank 0" in c["msg"]


def test_no_mark_left_on_user_tensors(misuse: tuple[int, list[dict[str, Any]]]) -> None:
    for r in misuse[1]:
        assert r["marked_after"] == [False] * 4


# ----------------------------------------------------------------- history, controls


def _history_and_controls(rank: int, world: int) -> dict[str, Any]:
    import spmd_types as spmd

    from spmd_moe import checking

    res: dict[str, Any] = {}
    exchanges = {"n": 0}
    real = checking._gather_rows

    def counting(*a: Any, **k: Any) -> Any:
        exchanges["n"] += 1
        return real(*a, **k)

    checking._gather_rows = counting  # type: ignore[assignment]

    # Call history: h (this rank's own tokens) wrongly into 'replicated' (rejected),
    # then correctly into 'sequence': succeeds, same bits as a fresh tensor.
    h = _tokens(200 + rank)
    moe_rep, moe_seq = _moe("replicated"), _moe("sequence")
    with sm.debug():
        res["h_rep"] = _catch(lambda: moe_rep(h))
        res["h_seq"] = _catch(lambda: moe_seq(h))
        res["h_seq_fresh"] = _catch(lambda: moe_seq(h.clone()))
    res["h_marked"] = spmd.has_local_type(h)
    # And a replicated x through each replicated layout in turn (each call correct).
    x = _tokens(300)
    calls = []
    with sm.debug():
        for layout in ("replicated", "invariant", "replicated"):
            calls.append((layout, _catch(lambda: _moe(layout)(x))["raised"]))
    res["x_calls"] = calls
    res["x_marked"] = spmd.has_local_type(x)

    # Controls: each layout, a correct input, forward + backward, debug on vs off.
    for layout in LAYOUTS:
        seed = 400 + rank if layout == "sequence" else 400
        for on in (False, True):
            moe = _moe(layout)
            xin = _tokens(seed, T=6).requires_grad_(True)
            before = exchanges["n"]
            with sm.debug(on):
                y = moe(xin)
                (y * y).sum().backward()
            res[f"{layout}_{on}"] = {
                "y": y.detach(), "gx": xin.grad, "gw": moe.router.gate.weight.grad,
                "exchanges": exchanges["n"] - before,
                "marks": [spmd.has_local_type(t) for t in (xin, moe.router.gate.weight, moe.experts.w1_EFD,
                                                          moe.tokens_per_expert_E)],
            }
    # The public router with this rank's own tokens: fine.
    moe = _moe("sequence")
    with sm.debug():
        res["router_own"] = _catch(lambda: moe.router(_tokens(500 + rank)))["raised"]

    # Partial: any values are summands, only the shape is checked.
    from spmd_moe.placement import as_par

    pctx = moe.pctx
    with sm.debug():
        res["par_values_differ"] = _catch(lambda: as_par(_tokens(600 + rank), pctx, "p_TD"))["raised"]
        res["par_shape_differs"] = _catch(lambda: as_par(_tokens(600, T=4 + rank), pctx, "p_TD"))
    checking._gather_rows = real  # type: ignore[assignment]
    return res


@pytest.fixture(scope="module")
def history() -> list[dict[str, Any]]:
    return run_distributed(_history_and_controls, 2, timeout=300)


def test_call_history_does_not_change_verdicts(history: list[dict[str, Any]]) -> None:
    for r in history:
        assert r["h_rep"]["raised"] == "PlacementError", r["h_rep"]
        assert r["h_seq"]["raised"] is None, r["h_seq"]
        assert torch.equal(r["h_seq"]["out"], r["h_seq_fresh"]["out"])
        assert r["h_marked"] is False
        assert r["x_calls"] == [("replicated", None), ("invariant", None), ("replicated", None)]
        assert r["x_marked"] is False


def test_correct_calls_pass_and_match_debug_off(history: list[dict[str, Any]]) -> None:
    for r in history:
        for layout in LAYOUTS:
            on, off = r[f"{layout}_True"], r[f"{layout}_False"]
            assert torch.equal(on["y"], off["y"]) and torch.equal(on["gx"], off["gx"]), layout
            assert torch.equal(on["gw"], off["gw"]), layout
            # Debug on verified something by exchange (the input or the replicated
            # parameters); debug off exchanged nothing.
            assert on["exchanges"] >= 1 and off["exchanges"] == 0, (layout, on["exchanges"], off["exchanges"])
            # No mark outlives the block: not on the input, not on the layer's tensors.
            assert on["marks"] == [False] * 4, (layout, on["marks"])
        assert r["router_own"] is None


def test_partial_is_checked_by_shape_only(history: list[dict[str, Any]]) -> None:
    for r in history:
        assert r["par_values_differ"] is None
        c = r["par_shape_differs"]
        assert c["raised"] == "PlacementError", c
        assert "p_TD on axis 'ep' (size 2): expected placement P" in c["msg"]
        assert "shape [5, 16] (float32) on rank 1 vs [4, 16] (float32) on rank 0" in c["msg"], c["msg"]
        assert "Fix:" in c["msg"]


# ----------------------------------------------------------------- a rank that never joins


def _never_joins(rank: int, world: int, pg_timeout: float) -> dict[str, Any]:
    import torch.distributed as dist

    from spmd_moe.placement import as_rep

    pctx = sm.ParallelContext.from_group(dist.group.WORLD, "ep")
    if rank == 1:
        time.sleep(pg_timeout + 5)  # never joins the exchange (and does not exit early)
        return {"raised": None}
    t0 = time.monotonic()
    with sm.debug():
        c = _catch(lambda: as_rep(_tokens(0), pctx, "x_TD"))
    c["elapsed"] = time.monotonic() - t0
    c.pop("out", None)
    return c


def test_rank_that_never_joins_ends_in_bounded_time() -> None:
    pg_timeout = 5.0
    res = run_ranks(_never_joins, 2, pg_timeout, timeout=90, pg_timeout=pg_timeout)
    c = res[0]["value"] if res[0]["ok"] else res[0]
    assert c.get("raised") == "DistributedError", c
    assert "x_TD: debug-mode placement check on axis 'ep' (size 2) failed" in c["msg"]
    assert "expected every rank to join" in c["msg"] and "Fix:" in c["msg"]
    assert c["elapsed"] < pg_timeout + 20, c["elapsed"]


# ----------------------------------------------------------------- the fingerprint (1 process)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool, torch.complex64])
def test_fingerprint_is_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        x = torch.randn(64, 8, generator=g) > 0
    elif dtype.is_complex:
        x = torch.randn(64, 8, generator=g, dtype=dtype)
    else:
        x = (torch.randn(64, 8, generator=g) * 3).to(dtype)
    # Equal bits -> equal fingerprint, also through a non-contiguous view.
    assert fingerprint(x) == fingerprint(x.clone())
    assert fingerprint(x.t()) == fingerprint(x.t().contiguous())
    # Two entries swapped (same multiset of values): position weights tell them apart.
    y = x.clone().reshape(-1)
    i = 3
    j = next(k for k in range(4, y.numel()) if not torch.equal(y[i], y[k]))
    y[i], y[j] = x.reshape(-1)[j], x.reshape(-1)[i]
    assert fingerprint(y.view_as(x)) != fingerprint(x)
    # One entry changed by the smallest step of its dtype.
    z = x.clone().reshape(-1)
    if dtype == torch.bool:
        z[5] = ~z[5]
    elif dtype.is_floating_point:
        z[5] = torch.nextafter(z[5], z[5] + 1)
    elif dtype.is_complex:
        z[5] = z[5] + 1e-6j
    else:
        z[5] += 1
    assert fingerprint(z.view_as(x)) != fingerprint(x)


def test_fingerprint_sees_signed_zero_and_nan_payloads() -> None:
    assert fingerprint(torch.tensor([0.0])) != fingerprint(torch.tensor([-0.0]))
    nan = torch.tensor([float("nan")])
    assert fingerprint(nan) == fingerprint(nan.clone())


# ----------------------------------------------------------------- same kernels as production
# The fused combine (spmd_moe/_fused_combine.py) runs only on CUDA with Triton. Debug mode
# runs it too and compares it bit for bit with the reference combine. On CPU the
# comparison path is exercised with a torch stand-in for the kernel: an exact one (must
# pass, and must have been called) and one off by one ulp on one rank (must be caught on
# every rank).


def _torch_combine(rows_SD: torch.Tensor, slots_S: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    from spmd_moe.moe import _weighted_sum

    T, K = weights_TK.shape
    slots_ND = rows_SD.new_zeros(T * K, rows_SD.shape[-1])
    slots_ND[slots_S] = rows_SD
    return _weighted_sum(slots_ND.view(T, K, -1), weights_TK)


def _fused_cases(rank: int, world: int) -> dict[str, Any]:
    from spmd_moe import _fused_combine as fc

    res: dict[str, Any] = {}
    calls = {"n": 0}

    def exact(rows: torch.Tensor, slots: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return _torch_combine(rows, slots, w)

    def off_by_one_ulp(rows: torch.Tensor, slots: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = _torch_combine(rows, slots, w)
        if rank == world - 1:
            y[0, 0] = torch.nextafter(y[0, 0], y[0, 0] + 1)
        return y

    fc.usable = lambda rows, w: True  # type: ignore[assignment]
    x = _tokens(42, T=40)  # > decode_max_tokens: the all-to-all (prefill) dispatcher on >1 rank
    moe = _moe("replicated")
    with torch.no_grad():
        with sm.debug(False):
            fc.weighted_combine = exact  # type: ignore[assignment]
            res["off"] = moe(x)
            res["off_calls"] = calls["n"]
        with sm.debug():
            calls["n"] = 0
            res["on"] = _catch(lambda: moe(x))
            res["on_calls"] = calls["n"]
            fc.weighted_combine = off_by_one_ulp  # type: ignore[assignment]
            res["broken"] = _catch(lambda: moe(x))
            res["broken"].pop("out", None)
    return res


@pytest.mark.parametrize("world", [1, 2])
def test_debug_mode_runs_and_compares_the_fused_combine(world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if world == 1:  # in this process (no group): the local dispatcher
        from spmd_moe import _fused_combine as fc

        monkeypatch.setattr(fc, "usable", fc.usable)  # restored after the test
        monkeypatch.setattr(fc, "weighted_combine", fc.weighted_combine)
        ranks = [_fused_cases(0, 1)]
    else:
        ranks = run_distributed(_fused_cases, world, timeout=180)
    for r in ranks:
        assert r["off_calls"] >= 1  # production (debug off) uses the kernel
        assert r["on"]["raised"] is None, r["on"]
        assert r["on_calls"] >= 1  # ... and so does debug mode
        assert torch.equal(r["on"]["out"], r["off"])
        c = r["broken"]
        assert c["raised"] == "SpmdMoeError", c
        assert "expected the production kernel to equal the reference path bit for bit" in c["msg"]
        assert f"ranks [{world - 1}]" in c["msg"] and "Fix:" in c["msg"]
