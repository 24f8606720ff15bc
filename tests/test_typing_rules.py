"""typing_rules: the join agrees with spmd_types, and every rule holds numerically.

1. ``typing_rules.join`` (read by the mypy plugin) against spmd_types' own per-axis
   inference (``_infer_local_type_for_axis_raw``) for every operand sequence of
   R / I / V / P / S up to length 3 and every linearity: the same output placement, or
   both raise for the same reason. ``through_function`` against spmd_types' inference
   for a non-linear op (a function that does not name an axis may apply any op).
   (tests/test_rules_runtime.py runs the op table itself under spmd_types.)
2. Each rule of typing_rules.RULES computed by THE LIBRARY'S OWN CODE (TopKRouter,
   GroupedExperts, SharedExperts, the dispatchers, spmd_moe.collectives) on a real
   2-rank gloo group, compared with a single-process computation of the full op written
   from the definitions (plain float64 torch, no spmd_moe code). Tolerances are stated
   where they are used.
3. The collectives' signatures are their rules.
"""

from __future__ import annotations

import itertools
import typing
from typing import Any

import pytest
import torch

import typing_rules
from spmd_moe import collectives as C
from tests.dist_utils import run_distributed

T, D, F_, E, K = 8, 6, 4, 4, 2  # tokens, model dim, expert hidden dim, experts, top-k
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps

# ----------------------------------------------------------------------------- 1. join


_LINEARITY = {"view": "LINEAR", "linear": "LINEAR", "multilinear": "MULTILINEAR", "nonlinear": "NONLINEAR"}
# The spmd_types message of each rule (its own words for the same reason).
_SPMD_WORDS = {
    "partial_nonlinear": "non-linear ops",
    "partial_times_partial": "multiple factors",
    "partial_plus_nonpartial": "affine",
    "partial_with_varying": "cannot combine with Varying",
    "invariant_mix": "Invariant type",
}


def _spmd_infer(linearity: str, operands: tuple[str, ...]) -> str:
    from spmd_types._checker import OpLinearity, _infer_local_type_for_axis_raw
    from spmd_types._scalar_sentinel import _Scalar
    from spmd_types.types import I, P, R, SpmdTypeError, V

    types = [{"R": R, "I": I, "V": V, "P": P, "S": _Scalar}[o] for o in operands]
    try:
        out = _infer_local_type_for_axis_raw("ep", types, linearity=OpLinearity[_LINEARITY[linearity]])  # type: ignore[arg-type]
    except SpmdTypeError as e:
        return "error: " + str(e)
    return str(out.value)


def _join(linearity: str, operands: tuple[str, ...]) -> str:
    try:
        out = typing_rules.join(linearity, list(operands), "ep")  # type: ignore[arg-type]
    except typing_rules.RuleViolation as e:
        return "error: " + e.rule.name
    assert out is not None
    return out


_SEQS = [s for n in (1, 2, 3) for s in itertools.product("RIVPS", repeat=n) if set(s) != {"S"}]


@pytest.mark.parametrize("linearity", sorted(_LINEARITY))
def test_join_is_spmd_types_inference(linearity: str) -> None:
    """Every sequence of R/I/V/P/S (length 1..3, at least one tensor placement): the same
    output, or both reject for the same reason (a view is linear for spmd_types)."""
    assert len(_SEQS) == 4 + 24 + 124  # 5^n sequences minus the all-S one
    for ops in _SEQS:
        ours, theirs = _join(linearity, ops), _spmd_infer(linearity, ops)
        if ours.startswith("error"):
            rule = ours.removeprefix("error: ")
            assert theirs.startswith("error"), (linearity, ops, ours, theirs)
            assert _SPMD_WORDS[rule] in theirs, (linearity, ops, rule, theirs)
        else:
            assert ours == theirs, (linearity, ops, ours, theirs)


def test_join_without_a_tensor_placement_is_none() -> None:
    # Only scalars / untyped tensors: no placement on the axis (spmd_types never infers
    # an axis no operand carries).
    for lin in _LINEARITY:
        assert typing_rules.join(lin, ["S", "S"], "ep") is None  # type: ignore[arg-type]


def test_through_function_is_a_non_linear_op() -> None:
    """A function that does not name the axis may apply any op: its verdict is spmd_types'
    for a non-linear op, with the rule named partial_through_function for Partial."""
    for n in (1, 2, 3):
        for ops in itertools.product("RIVP", repeat=n):
            theirs = _spmd_infer("nonlinear", ops)
            try:
                ours = typing_rules.through_function(list(ops), "dp")
            except typing_rules.RuleViolation as e:
                assert theirs.startswith("error"), (ops, e.rule.name, theirs)
                want = "partial_through_function" if "P" in ops else "invariant_mix"
                assert e.rule.name == want, (ops, e.rule.name)
                continue
            assert ours == theirs, (ops, ours, theirs)


# ----------------------------------------------------------------------------- 1b. soundness

# Cases where typing_rules.ops.join with the table's linearity alone (every operand in
# the same role; what the plugin did before typing_rules.calls) says the result is
# Partial but it is not: the sum over ranks of the per-rank results is not the op on the
# summed input. Found by test_partial_verdicts_are_numerically_true; each is checked to
# still fail for ops.join, and to be rejected by join_call (the plugin's join).
UNSOUND: dict[str, str] = {
    "__truediv__:ff:RP": "1/y is non-linear in the divisor",
    "div:ff:RP": "1/y is non-linear in the divisor",
    "gather:fi:RP": "a Partial index: indices do not add",
    "take_along_dim:fi:RP": "a Partial index: indices do not add",
    "index_select:fj:RP": "a Partial index: indices do not add",
    "__getitem__:fj:RP": "a Partial index: indices do not add",
    "repeat_interleave:fn:RP": "Partial repeat counts: counts do not add",
    "masked_fill:fb:RP": "a Partial mask: masks do not add",
    "where:bff:PRR": "a Partial condition: conditions do not add",
    "where:bfs:PRS": "a Partial condition: conditions do not add",
    "where:bff:RPR": "where is additive in its branches: the Replicate branch is summed n times",
    "where:bff:RRP": "where is additive in its branches: the Replicate branch is summed n times",
    "where:bfs:RPS": "where is additive in its branches: the scalar branch is summed n times",
}


def _summands(kind: str, letter: str, seed: int) -> tuple[Any, Any, Any]:
    """(global value, rank 0's local, rank 1's local) of one operand."""
    from tests.rules_runtime_cases import make_operand

    g = make_operand(kind, seed)
    if letter == "P":
        if kind in ("f", "g"):  # float summands: a random split of the global value
            s0 = torch.randn(g.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=g.dtype)
            return g, s0, g - s0
        return g, g.clone(), torch.zeros_like(g)  # integer / bool: g + 0 (valid indices)
    if letter == "V":  # only a view op's shape / dtype donor: same shape, other values
        return g, g, make_operand(kind, 200 + seed)
    return g, g, g  # R / I / S: the same on every rank


def _p_claims(verdict: Any) -> list[tuple[str, str, str]]:
    from tests.rules_runtime_cases import CASES

    out = []
    for op, kinds, _ in CASES:
        n = sum(k != "s" for k in kinds)
        for letters in itertools.product("RIVP", repeat=n):
            it = iter(letters)
            ops = "".join("S" if k == "s" else next(it) for k in kinds)
            if verdict(op, ops) == "P":
                out.append((op, kinds, ops))
    return out


@pytest.mark.parametrize("verdict", ["table_join", "plugin_join"])
def test_partial_verdicts_are_numerically_true(verdict: str) -> None:
    """For every table case typing_rules types Partial, simulate two ranks: each Partial
    operand split into two summands, the others the same on both (a view op's Varying
    donor differs): the per-rank results must sum to the op on the global operands, up
    to rounding in the result's dtype (4 eps of the largest summand: dtype casts round
    each summand). With the table's linearity alone (table_join) the cases listed in
    UNSOUND fail; with the plugin's join (typing_rules.calls.join_call: operand roles)
    none does."""
    from tests.rules_runtime_cases import CASES, plugin_join, table_join

    fns = {(op, kinds): fn for op, kinds, fn in CASES}
    claims = _p_claims(table_join if verdict == "table_join" else plugin_join)
    expected = UNSOUND if verdict == "table_join" else {}
    assert len(claims) > 80, len(claims)  # the table has ~100 Partial-preserving cases
    unsound = {}
    for op, kinds, ops in claims:
        fn = fns[(op, kinds)]
        trip = [_summands(k, o, j) for j, (k, o) in enumerate(zip(kinds, ops))]

        def call(i: int) -> torch.Tensor:  # fresh operands: in-place ops mutate them
            args = [t[i].clone() if isinstance(t[i], torch.Tensor) else t[i] for t in trip]
            return fn(*args)

        try:
            full, y0, y1 = call(0), call(1), call(2)
            err = _err(y0.double() + y1.double(), full)
            eps = torch.finfo(full.dtype).eps if full.dtype.is_floating_point else 0.0
            tol = 4 * eps * float(torch.maximum(y0.double().abs(), y1.double().abs()).max())
            ok = err <= tol
        except RuntimeError as e:  # e.g. an index summand out of range
            ok, err = False, f"{type(e).__name__}: {e}"
        key = f"{op}:{kinds}:{ops}"
        if not ok:
            unsound[key] = err
    assert set(unsound) == set(expected), {
        "typing_rules says Partial, numbers disagree (not listed)": sorted(set(unsound) - set(expected)),
        "listed but numerically fine now": sorted(set(expected) - set(unsound)),
    }


def test_join_call_differs_from_join_only_on_operand_roles() -> None:
    """join_call rejects every UNSOUND case and otherwise changes a verdict only for the
    ops with operand roles (non-linear operands, where's branches)."""
    from typing_rules.calls import NONLINEAR_OPERANDS

    from tests.rules_runtime_cases import CASES, plugin_join, table_join

    for key in UNSOUND:
        op, _, ops = key.split(":")
        assert plugin_join(op, ops).startswith("error"), key
    for op, kinds, _ in CASES:
        n = sum(k != "s" for k in kinds)
        for letters in itertools.product("RIVP", repeat=n):
            it = iter(letters)
            ops = "".join("S" if k == "s" else next(it) for k in kinds)
            a, b = table_join(op, ops), plugin_join(op, ops)
            if op not in NONLINEAR_OPERANDS:
                assert a == b, (op, kinds, ops, a, b)
            elif a != b and not a.startswith("error"):
                assert f"{op}:{kinds}:{ops}" in UNSOUND, (op, kinds, ops, a, b)


# ----------------------------------------------------------------------------- 2. numbers


def _seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (possibly differently sized) tensor, concatenated along dim 0."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach())
    return torch.cat(parts)


def _all(x: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach())
    return parts


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _swiglu_ref(x_D: torch.Tensor, w1_FD: torch.Tensor, w2_DF: torch.Tensor, w3_FD: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP of one row, from its definition."""
    return w2_DF @ (torch.nn.functional.silu(w1_FD @ x_D) * (w3_FD @ x_D))


def _rules_on_ranks(rank: int, world: int) -> dict[str, dict[str, Any]]:
    import torch.distributed as dist
    import torch.nn.functional as F

    from spmd_moe.config import MoEConfig
    from spmd_moe.dispatch.all_gather import AllGatherDispatcher
    from spmd_moe.dispatch.all_to_all import AllToAllDispatcher
    from spmd_moe.dispatch.base import count_per_expert
    from spmd_moe.dispatch.local import LocalDispatcher
    from spmd_moe.experts import GroupedExperts, SharedExperts
    from spmd_moe.parallel import ParallelContext
    from spmd_moe.router import TopKRouter

    n, r = world, rank
    pctx = ParallelContext.from_group(dist.group.WORLD, "ep")
    sl = slice(r * T // n, (r + 1) * T // n)  # this rank's token slice
    X = _seeded(0, T, D)  # the global tokens (every rank can build them)
    Wg = _seeded(1, E, D)  # the router's gate weight (Replicate)
    res: dict[str, dict[str, Any]] = {}

    def cfg(**kw: Any) -> MoEConfig:
        return MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, param_dtype=torch.float64, **kw)

    def router_of(c: MoEConfig) -> TopKRouter:
        m = TopKRouter(c, pctx)
        with torch.no_grad():
            m.gate.weight.copy_(Wg)
        return m

    # The router's gate and score function run in fp32 (torchtitan's choice): a dot
    # product of D terms rounded in fp32 is off by at most ~D*eps32*sum|x_d w_d|; the
    # scores (sigmoid' <= 1/4, softmax' <= 1/2 per logit, two logits move) inherit it.
    gate_tol = (D + 2) * EPS32 * float((X.abs() @ Wg.abs().T).max())

    with torch.no_grad():
        # ------------------------------------------------ gate_matmul: x V, W R -> V
        # sigmoid scores are element-wise in the logits: rank r's scores are the rows of
        # sigmoid(X @ W.T) of its own tokens.
        w_s, ids_s, s_s = router_of(cfg(score_func="sigmoid"))(X[sl])
        ref_sig = torch.sigmoid(X @ Wg.T)
        res["gate_matmul"] = {"err": _err(_gather(s_s), ref_sig), "tol": gate_tol}

        # ------------------------------------------------ score_topk: V -> V
        w_loc, ids_loc, s_loc = router_of(cfg())(X[sl])
        ref_scores = torch.softmax(X @ Wg.T, dim=-1)
        ref_top = ref_scores.topk(K + 1, dim=-1)
        ref_ids = ref_top.indices[:, :K]
        # top-k must not depend on rounding: the k-th and (k+1)-th scores are far apart
        margin = float((ref_top.values[:, K - 1] - ref_top.values[:, K]).min())
        ids_all = _gather(ids_loc)
        w_all = _gather(w_loc)
        order = ids_all.argsort(dim=-1)  # sorted=False top-k: compare as sets, by id
        res["score_topk"] = {
            "err": max(_err(_gather(s_loc), ref_scores),
                       _err(ids_all.gather(1, order), ref_ids.sort(dim=-1).values.to(ids_all.dtype)),
                       _err(w_all.gather(1, order), ref_scores.gather(1, ref_ids.sort(dim=-1).values))),
            "tol": gate_tol,
            "margin": margin,
        }

        # ------------------------------------------------ token_count: V -> P
        ref_count = torch.bincount(ref_ids.reshape(-1), minlength=E)
        counts = C.all_reduce(C.partial_from_shards(count_per_expert(ids_loc, E), pctx), pctx)
        # forbidden: a Replicate x (every rank routes every token) reinterpreted as a
        # summand and summed: each token counted n times.
        _, ids_rep, _ = router_of(cfg())(X)
        counts_rep = C.all_reduce(C.partial_from_shards(count_per_expert(ids_rep, E), pctx), pctx)
        res["token_count"] = {
            "err": _err(counts, ref_count), "tol": 0.0,  # integers
            "forbidden_R_is_n_times": bool(torch.equal(counts_rep, n * ref_count)),
            "forbidden_R_differs": _err(counts_rep, ref_count),
        }

        # ------------------------------------------------ permute: V, V -> V
        # The dispatcher's expert sort within a rank: rank r's rows in (expert, slot)
        # order; over ranks, the block-diagonal permutation of all tokens.
        local = LocalDispatcher(E, pctx)
        rows_RD, counts_E, lstate = local.dispatch(X[sl], ids_loc, 0)
        ids_l = ids_loc.reshape(-1).tolist()
        want_rows = [X[sl][s // K] for s in sorted(range(len(ids_l)), key=lambda s: (ids_l[s], s))]
        back = local.combine(rows_RD, lstate)
        res["permute"] = {
            "err": max(_err(_gather(rows_RD), _gather(torch.stack(want_rows))),
                       _err(back, X[sl].unsqueeze(1).expand(-1, K, -1))),
            "tol": 0.0,  # rows only move
        }

        # ------------------------------------------------ grouped_gemm / swiglu / all_to_all
        W1, W2, W3 = _seeded(2, E, F_, D), _seeded(3, E, D, F_), _seeded(4, E, F_, D)
        experts = GroupedExperts(cfg(), pctx)
        e0, e1 = experts.expert_start, experts.expert_stop
        experts.w1_EFD.copy_(W1[e0:e1]), experts.w2_EDF.copy_(W2[e0:e1]), experts.w3_EFD.copy_(W3[e0:e1])
        a2a = AllToAllDispatcher(E, pctx)
        recv_RD, counts_e, astate = a2a.dispatch(X[sl], ids_loc, 0)
        out_RD = experts(recv_RD, counts_e, rows_exact=True)
        # which (token, expert) each received row is, from the definition: my experts in
        # order, then source ranks in order, then the source's slots in order
        ids_g = ref_ids.tolist()
        tok_e = [(j * T // n + s // K, e) for e in range(e0, e1) for j in range(n)
                 for s in range((T // n) * K) if ids_g[j * T // n + s // K][s % K] == e]
        want_out = torch.stack([_swiglu_ref(X[t], W1[e], W2[e], W3[e]) for t, e in tok_e])
        out_scale = max(1.0, float(want_out.abs().max()))
        back_TKD = a2a.combine(out_RD, astate)
        ids_mine = ids_loc.tolist()
        want_back = torch.stack([torch.stack([_swiglu_ref(X[sl][t], W1[e], W2[e], W3[e]) for e in ids_mine[t]])
                                 for t in range(T // n)])
        # float64 with D, F <= 6 terms per dot product, summed in another order than
        # the reference: a few ulps of the largest value
        f64_tol = 64 * EPS64 * out_scale
        res["grouped_gemm"] = {"err": _err(out_RD, want_out), "tol": f64_tol,
                               "rows": len(tok_e), "counts_e": counts_e.tolist()}
        res["swiglu"] = {"err": _err(back_TKD, want_back), "tol": f64_tol}
        res["all_to_all/dispatch"] = {"err": _err(recv_RD, X[[t for t, _ in tok_e]]), "tol": 0.0}
        # rank_view's use: the decode dispatcher gathers every slice (V -> R), keeps the
        # rows of its own experts (rank_view R -> V) and sums the outputs back: the same
        # slots as the reference (non-local rows come out exactly zero)
        ag = AllGatherDispatcher(E, pctx)
        g_rows, g_counts, gstate = ag.dispatch(X[sl], ids_loc, 0)
        res["rank_view/decode_dispatch"] = {
            "err": _err(ag.combine(experts(g_rows, g_counts), gstate), want_back), "tol": f64_tol}
        # forbidden: a Partial gate (rows split into two summands) through the experts
        half = _seeded(20 + r, *recv_RD.shape)
        part = experts(half, counts_e, rows_exact=True) + experts(recv_RD - half, counts_e, rows_exact=True)
        res["swiglu"]["forbidden_P_differs"] = _err(part, out_RD)

        # ------------------------------------------------ weighted_combine: V, V -> V
        from spmd_moe import moe as _moe

        weighted_sum = getattr(_moe, "_weighted_sum")
        slots = _seeded(5, T, K, D)
        wts = torch.rand(T, K, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        want_c = torch.stack([sum(wts[t, k] * slots[t, k] for k in range(K)) for t in range(T)])  # type: ignore[misc]
        # the combine weights in fp32 (torchtitan's order): K products rounded in fp32
        c_tol = 4 * K * EPS32 * float((wts.abs().unsqueeze(-1) * slots.abs()).sum(1).max())
        res["weighted_combine"] = {"err": _err(_gather(weighted_sum(slots[sl], wts[sl])), want_c), "tol": c_tol}

        # ------------------------------------------------ column_parallel / row_parallel
        Fs = 2 * F_  # shared hidden dim, sharded over the axis
        se = SharedExperts(cfg(shared_hidden_dim=Fs), pctx)
        s1, s2, s3 = _seeded(7, Fs, D), _seeded(8, D, Fs), _seeded(9, Fs, D)
        f = slice(r * Fs // n, (r + 1) * Fs // n)
        se.w1.weight.copy_(s1[f]), se.w2.weight.copy_(s2[:, f]), se.w3.weight.copy_(s3[f])
        y_P = se(X)  # this rank's summand
        h_full = F.silu(X @ s1.T) * (X @ s3.T)  # the unsharded hidden activations
        y_full = h_full @ s2.T
        scale = max(1.0, float(y_full.abs().max()))
        # column_parallel: rank r's hidden columns f_r -> its summand h[:, f_r] @ w2[:, f_r].T
        res["column_parallel"] = {"err": _err(y_P, h_full[:, f] @ s2[:, f].T), "tol": 64 * EPS64 * scale}
        res["row_parallel"] = {"err": _err(C.all_reduce(y_P, pctx), y_full), "tol": 64 * EPS64 * scale}

    # ------------------------------------------------ rank_view: R -> V, backward V -> P
    # Under spmd_types' tracking (the library's reinterpret path runs): each rank keeps
    # its rows of a replicated x; the per-rank gradients are summands of the gradient of
    # the whole (d/dx sum x^3 = 3 x^2).
    import spmd_types as spmd
    from spmd_types.checker import typecheck

    with typecheck(strict_mode="permissive"):
        xr = X.clone().requires_grad_(True)
        spmd.assert_type(xr, {pctx.group: spmd.R})
        v = C.rank_view(xr, pctx)  # type: ignore[arg-type]
        fwd_err = _err(v, X)
        loss = C.partial_from_shards((v[sl] ** 3).sum(), pctx)
        loss.backward()
    assert xr.grad is not None
    outside = torch.ones(T, dtype=torch.bool)
    outside[sl] = False
    res["rank_view"] = {
        "err": max(fwd_err, _err(sum(_all(xr.grad)), 3 * X ** 2)),  # type: ignore[arg-type]
        "tol": 4 * EPS64 * float((3 * X ** 2).abs().max()),  # x**3's derivative, rounded
        "grad_outside_my_rows": float(xr.grad[outside].abs().max()),
    }

    # ------------------------------------------------ collectives, autograd off and on
    Xp = [_seeded(10 + i, T, D) for i in range(n)]  # rank i's summand of a Partial x
    G = [_seeded(30 + i, T, D) for i in range(n)]  # rank i's upstream gradient (summand)
    counts_nn = torch.tensor([[1, 3], [2, 0]])  # rows rank i sends to rank j
    A = [_seeded(40 + i, int(counts_nn[i].sum()), D) for i in range(n)]
    GA = [_seeded(50 + i, int(counts_nn[:, i].sum()), D) for i in range(n)]  # grads of what i receives
    Xsum = Xp[0] + Xp[1]  # n == 2: one IEEE addition, commutative: bitwise what gloo sums
    Gsum = G[0] + G[1]
    for mode in ("raw", "autograd"):
        grad_on = mode == "autograd"

        def guarded(name: str, case: Any) -> None:
            """A collective that raises is reported as its rule's failure (both ranks
            take the same path, so none is left waiting in a collective)."""
            try:
                case()
            except Exception as e:  # noqa: BLE001 - reported to the test
                res[f"{name}/{mode}"] = {"err": float("inf"), "tol": 0.0, "raised": f"{type(e).__name__}: {e}"}

        def run(fn: Any, x: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
            leaf = x.clone().requires_grad_(grad_on)
            with torch.set_grad_enabled(grad_on):
                y = fn(leaf)
                if grad_on and g is not None:
                    (y * g).sum().backward()
            return y.detach(), leaf.grad

        def case_0() -> None:
            y, gx = run(lambda t: C.split_tokens(t, pctx), X, G[r][sl])
            res[f"split_tokens/{mode}"] = {"err": _err(y, X[sl]), "tol": 0.0}
            if grad_on:  # R's gradient is Partial: the summands add up to the full gradient
                res[f"split_tokens/{mode}"]["grad_err"] = _err(sum(_all(gx)), torch.cat([G[i][i * T // n:(i + 1) * T // n] for i in range(n)]))  # type: ignore[arg-type]
        guarded("split_tokens", case_0)

        def case_1() -> None:
            y, gx = run(lambda t: C.all_gather(t, pctx), X[sl], G[r])
            res[f"all_gather/{mode}"] = {"err": _err(y, X), "tol": 0.0}
            if grad_on:  # the Replicate output's gradient summands, summed and split
                res[f"all_gather/{mode}"]["grad_err"] = _err(gx, Gsum[sl])  # type: ignore[arg-type]
        guarded("all_gather", case_1)

        def case_2() -> None:
            y, gx = run(lambda t: C.reduce_scatter(t, pctx), Xp[r], G[r][sl])
            res[f"reduce_scatter/{mode}"] = {"err": _err(y, Xsum[sl]), "tol": 0.0}
            if grad_on:  # a Partial input's gradient is Replicate: every slice's gradient
                res[f"reduce_scatter/{mode}"]["grad_err"] = _err(gx, torch.cat([G[i][i * T // n:(i + 1) * T // n] for i in range(n)]))  # type: ignore[arg-type]
        guarded("reduce_scatter", case_2)

        def case_3() -> None:
            y, gx = run(lambda t: C.all_reduce(t, pctx), Xp[r], G[r])
            res[f"all_reduce/{mode}"] = {"err": _err(y, Xsum), "tol": 0.0}
            if grad_on:
                res[f"all_reduce/{mode}"]["grad_err"] = _err(gx, Gsum)  # type: ignore[arg-type]
        guarded("all_reduce", case_3)

        def case_4() -> None:
            out_splits = [int(counts_nn[j][r]) for j in range(n)]
            y, gx = run(lambda t: C.all_to_all(t, pctx, counts_nn[r].tolist(), out_splits), A[r], GA[r])
            want = torch.cat([A[j].split(counts_nn[j].tolist())[r] for j in range(n)])
            res[f"all_to_all/{mode}"] = {"err": _err(y, want), "tol": 0.0}
            if grad_on:  # the mirror exchange: my block j's gradient comes back from rank j
                want_g = torch.cat([GA[j].split(counts_nn[:, j].tolist())[r] for j in range(n)])
                res[f"all_to_all/{mode}"]["grad_err"] = _err(gx, want_g)  # type: ignore[arg-type]
        guarded("all_to_all", case_4)

        def case_5() -> None:
            y, gx = run(lambda t: C.invariant_to_replicate(t, pctx), X, G[r])
            res[f"invariant_to_replicate/{mode}"] = {"err": _err(y, X), "tol": 0.0}
            if grad_on:  # backward sums the Partial gradient: complete on every rank (I)
                res[f"invariant_to_replicate/{mode}"]["grad_err"] = _err(gx, Gsum)  # type: ignore[arg-type]
        guarded("invariant_to_replicate", case_5)

        def case_6() -> None:
            y, gx = run(lambda t: C.replicate_to_invariant(t, pctx), X, G[0])  # I: the same grad everywhere
            res[f"replicate_to_invariant/{mode}"] = {"err": _err(y, X), "tol": 0.0}
            if grad_on:  # backward: the complete gradient as Partial summands (they sum to it)
                res[f"replicate_to_invariant/{mode}"]["grad_err"] = _err(sum(_all(gx)), G[0])  # type: ignore[arg-type]
        guarded("replicate_to_invariant", case_6)

    return res


@pytest.fixture(scope="module")
def computed() -> list[dict[str, dict[str, Any]]]:
    return run_distributed(_rules_on_ranks, 2, timeout=240)


def test_every_rule_is_computed(computed: list[dict[str, dict[str, Any]]]) -> None:
    names = {k.split("/")[0] for k in computed[0]}
    assert names == set(typing_rules.RULES), sorted(names ^ set(typing_rules.RULES))


@pytest.mark.parametrize("name", sorted(typing_rules.RULES))
def test_rule_holds_numerically(name: str, computed: list[dict[str, dict[str, Any]]]) -> None:
    rule = typing_rules.RULES[name]
    for rank, res in enumerate(computed):
        for case in [c for c in res if c.split("/")[0] == name]:
            got = res[case]
            assert got["err"] <= got["tol"], (rank, case, got)
            if "grad_err" in got:  # gradients: the same data movement / sums, exact
                assert got["grad_err"] <= 0.0, (rank, case, got)
        assert any(c.split("/")[0] == name for c in res)
        if rule.collective and rule.call.startswith("spmd_moe.collectives.") and name not in ("rank_view",):
            # collectives: run with autograd off and on, the gradient checked when on
            assert {f"{name}/raw", f"{name}/autograd"} <= set(res), (name, sorted(res))
            assert "grad_err" in res[f"{name}/autograd"], name


def test_gate_tolerance_is_below_the_routing_margin(computed: list[dict[str, dict[str, Any]]]) -> None:
    # top-k ids are compared exactly: the fp32 gate's error must not be able to swap them
    for res in computed:
        assert res["score_topk"]["margin"] > 10 * res["score_topk"]["tol"], res["score_topk"]


def test_token_count_of_a_replicated_input_is_n_times(computed: list[dict[str, dict[str, Any]]]) -> None:
    """The forbidden input of token_count (ids of a Replicate x): summed over ranks, every
    token is counted n times (tests/test_rules_runtime.py shows the checker rejects it)."""
    for res in computed:
        assert res["token_count"]["forbidden_R_is_n_times"], res["token_count"]
        assert res["token_count"]["forbidden_R_differs"] >= 1, res["token_count"]


def test_swiglu_of_a_partial_gate_is_wrong(computed: list[dict[str, dict[str, Any]]]) -> None:
    # silu(a + b) != silu(a) + silu(b): the experts on two summands of their rows sum to
    # something else than the experts on the rows (far beyond the float64 tolerance)
    for res in computed:
        assert res["swiglu"]["forbidden_P_differs"] > 1e3 * res["swiglu"]["tol"], res["swiglu"]


def test_all_to_all_moved_rows_to_experts(computed: list[dict[str, dict[str, Any]]]) -> None:
    # the grouped GEMM ran on a non-trivial split: every rank received rows
    for res in computed:
        assert res["grouped_gemm"]["rows"] > 0 and sum(res["grouped_gemm"]["counts_e"]) == res["grouped_gemm"]["rows"]


def test_rank_view_gradient_is_a_summand(computed: list[dict[str, dict[str, Any]]]) -> None:
    # backward V -> P: a rank's gradient is its summand, zero outside the rows it used
    # (their sum over ranks is checked by test_rule_holds_numerically[rank_view])
    for res in computed:
        assert res["rank_view"]["grad_outside_my_rows"] == 0.0, res["rank_view"]


# ----------------------------------------------------------------------------- 3. signatures


@pytest.mark.parametrize("name", sorted(typing_rules.COLLECTIVE_FUNCS))
def test_collective_signature_matches_rule(name: str) -> None:
    """spmd_moe.collectives.<name> is annotated with its rule (the plugin reads the rule;
    the annotation, generic in the axis A, is what mypy shows without the plugin)."""
    import re

    rule = typing_rules.COLLECTIVE_FUNCS[name]
    ann = getattr(C, name).__annotations__  # strings: Placed[...] over a TypeVar
    first = next(iter(ann))
    letter = {"Rep": "R", "Inv": "I", "Var": "V", "Par": "P"}
    pat = re.compile(r"^Placed\[(Rep|Inv|Var|Par)\[A\]\]$")
    m_in, m_out = pat.match(str(ann[first])), pat.match(str(ann["return"]))
    assert m_in and m_out, (name, ann)
    assert letter[m_in.group(1)] == rule.inputs[0][1], (name, ann)
    assert letter[m_out.group(1)] == rule.output, (name, ann)
    assert ann["pctx"] == "ParallelContext[A]", (name, ann)


def test_fix_hints_come_from_rules() -> None:
    from spmd_moe.checking import placement_fix

    for expected, actual in (("R", "P"), ("R", "V"), ("V", "P"), ("P", "V"), ("R", "I"), ("I", "R")):
        ops = typing_rules.converting_collectives(actual, expected)
        assert len(ops) == 1, (expected, actual, ops)
        assert ops[0].call in placement_fix(expected, actual)
    assert typing_rules.fix("P", "R") is None  # no single op turns R into P
