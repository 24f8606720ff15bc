"""spmd_moe.kernels.fast_route (inference router: bf16 GEMM with fp32 output + one Triton
route kernel) against a float64 loop and the torch router (TopKRouter._route).

On CUDA it runs on bf16. On CPU the route kernel runs in Triton's interpreter (this file
re-runs itself in a subprocess with TRITON_INTERPRET=1 and the opt-in
SPMD_MOE_FAST_ROUTE_INTERPRET=1): there the layer is fp32 holding bf16 values and the
logits come from the fp32 GEMM (the fallback), the same products.

Tolerances, and why. delta_t: a bound on the error of token t's fp32 logits,
D * 2^-23 * max_e sum_d |x_d w_ed|: the bf16 x bf16 products are exact in fp32, and each of
the < D adds of an fp32 sum in any order errs by at most one fp32 ulp (2^-23 relative of a
partial sum <= sum |x w|; a whole ulp, not half: the tensor cores' fp32 accumulation aligns
and truncates, it is not an IEEE FMA chain; measured on an H200 at D=2048: 2.7e-6 of
max|logit|, far inside). Given exact fp32 logits (the kernel tests), delta_t = 0.
* The kernel's own arithmetic: exp on the GPU is ex2.approx after an fp32 multiply by
  log2(e), so exp(y) (y = logit - max <= 0) is within (|y| + 2) * 2^-23 relative, plus a
  few ulps for the sums and the (approximate) division: with |y| < 28 (our logits) all of it
  within A = 2^-18 (in Triton's interpreter numpy's exp is closer still).
* Choice (score + bias): softmax moves by at most 2 delta_t s_e <= 2 delta_t, sigmoid by
  delta_t / 4, plus A. The chosen experts must be the float64 top-k up to
  2 * (2 delta_t + A) (either side of the comparison may err): a near-tie may go either
  way, never more.
* Gate values at the chosen ids: relative 4 delta_t + 2A of the float64 value (the score's
  error, then the renorm's sum and division), + 2^-21 absolute for tiny ones.
* Ties that are exact in the logits: the lowest ids win (route_topk's rule; torch.topk
  promises no order), ids ascending and distinct per token: asserted exactly.
* The layer (fast router on vs off, the same ids): the output is linear in the gate values
  (relative error <= 2^-17 each, summing to <= 1 with renorm), so in fp32 within 2^-15 *
  max|y| (4x for slot outputs above max|y|); in bf16 each term and each add of the combine
  may round the other way: K + 1 bf16 ulps (2^-7) of max|y|.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import spmd_moe as sm
from spmd_moe.kernels import fast_route as fr
from triton_interp import interpreting, rerun, triton_ok

ON_CUDA = torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when it is first imported: on CPU this file re-runs itself.
IN_INTERPRETER = interpreting("SPMD_MOE_FAST_ROUTE_INTERPRET")
pytestmark = pytest.mark.skipif(not triton_ok(), reason="needs Triton (CUDA or its interpreter)")
kernel_test = pytest.mark.skipif(not ON_CUDA and not IN_INTERPRETER, reason="runs in the subprocess below")
DEV = "cuda" if ON_CUDA else "cpu"
DT = torch.bfloat16 if ON_CUDA else torch.float32  # the interpreter cannot load bf16
D, F, E, K = 64, 32, 16, 4
A = 2.0**-18  # the route kernel's own arithmetic (module docstring)


def grid(full: list[Any], on_cuda: list[Any]) -> list[Any]:
    """A parameter grid: the full one in the interpreter; on CUDA, where each new kernel
    specialization compiles (~1 s), a subset that keeps every code path."""
    return on_cuda if ON_CUDA else full


@pytest.mark.skipif(ON_CUDA or IN_INTERPRETER, reason="CPU only, once")
def test_kernels_in_triton_interpreter() -> None:
    rerun(__file__, "SPMD_MOE_FAST_ROUTE_INTERPRET")


# ------------------------------------------------------------------ float64 reference


def _ref64(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, choice) in float64."""
    lg = logits_TE.double().cpu()
    s = torch.sigmoid(lg) if score == "sigmoid" else torch.softmax(lg, -1)
    return s, s if bias_E is None else s + bias_E.double().cpu()


def _check_routes(w_TK: torch.Tensor, ids_TK: torch.Tensor, logits64_TE: torch.Tensor, delta_T: torch.Tensor,
                  bias_E: torch.Tensor | None, score: str, norm: bool, scale: float) -> int:
    """Assert the tolerances of the module docstring; returns how many tokens took a
    near-tie the other way than float64 (allowed)."""
    T, k = ids_TK.shape
    assert ids_TK.dtype == torch.int64 and w_TK.dtype == torch.float32
    ids = ids_TK.cpu()
    w = w_TK.double().cpu()
    assert bool((ids[:, 1:] > ids[:, :-1]).all()), "ids not strictly ascending per token"
    assert int(ids.min()) >= 0 and int(ids.max()) < logits64_TE.shape[1]
    s, choice = _ref64(logits64_TE, bias_E, score)
    d = delta_T.double().cpu()
    tol_c = 2 * ((2 if score == "softmax" else 0.25) * d + A)
    picked = torch.zeros_like(choice, dtype=torch.bool).scatter_(1, ids, True)
    low_in = choice.masked_fill(~picked, float("inf")).min(1).values
    high_out = choice.masked_fill(picked, float("-inf")).max(1).values
    assert bool((low_in >= high_out - tol_c).all()), f"not the top-{k}: worst gap {float((high_out - low_in).max()):.3g}"
    want = s.gather(1, ids)
    if norm:
        want = want / want.sum(-1, keepdim=True)
    want = want * scale
    tol_w = (4 * d[:, None] + 2 * A) * want.abs() + 2.0**-21
    assert bool(((w - want).abs() <= tol_w).all()), f"gate values off: {float(((w - want).abs() / tol_w).max()):.3g} x tol"
    top = torch.topk(choice, k, -1).indices.sort(-1).values
    return int((top != ids).any(-1).sum())


# ------------------------------------------------------------------ the route kernel alone

ROUTE_CASES = {  # score, norm, bias, scale
    "softmax": ("softmax", False, False, 1.0),
    "softmax_norm_bias": ("softmax", True, True, 1.0),
    "sigmoid_norm_scale": ("sigmoid", True, False, 2.5),
    "sigmoid_bias_scale": ("sigmoid", False, True, 1.5),
}


def _bias(n: int, on: bool) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(11)
    return (torch.randn(n, generator=g) * 0.05).to(DEV) if on else None


def _route(lg: torch.Tensor, bias: torch.Tensor | None, k: int, score: str, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return fr.route_logits(lg, bias, top_k=k, score_func=score, route_norm=norm, route_scale=scale)


@kernel_test
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", list(ROUTE_CASES))
@pytest.mark.parametrize("e,k", grid([(16, 4), (12, 3), (128, 8)], [(12, 3), (128, 8)]))
def test_route_kernel_matches_float64(T: int, case: str, e: int, k: int) -> None:
    """Odd T (programs of several tokens with a tail), E not a power of 2, Qwen3's 128/8."""
    score, norm, bias_on, scale = ROUTE_CASES[case]
    g = torch.Generator().manual_seed(T * 1000 + e)
    lg = (torch.randn(T, e, generator=g) * 2).to(DEV)
    bias = _bias(e, bias_on)
    w, ids = _route(lg, bias, k, score, norm, scale)
    flips = _check_routes(w, ids, lg, torch.zeros(T), bias, score, norm, scale)
    assert flips == 0  # random fp32 logits: no near-ties at the kernel's few ulps


@kernel_test
@pytest.mark.parametrize("tokens,warps", grid([(1, 1), (8, 1), (3, 2)], [(3, 2)]))
def test_launch_shape_topk_kernel(tokens: int, warps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """route_kernel: tokens per program only change which program routes a token, not its
    arithmetic (the same code on its own lanes): bitwise at the same warps. More warps
    split a token's 128 lanes over warps, another reduction tree for the softmax and renorm
    sums (measured on an H200: other bits): the same ids, gate values within 2A."""
    lg = torch.randn(37, 128, generator=torch.Generator().manual_seed(2)).to(DEV)
    monkeypatch.setitem(fr.LAUNCH, "kernel", "topk")
    monkeypatch.setitem(fr.LAUNCH, "tokens", 4)
    monkeypatch.setitem(fr.LAUNCH, "warps", warps)
    ref = _route(lg, None, 8, "softmax", True, 1.0)
    monkeypatch.setitem(fr.LAUNCH, "tokens", tokens)
    got = _route(lg, None, 8, "softmax", True, 1.0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    monkeypatch.setitem(fr.LAUNCH, "warps", 1)
    one = _route(lg, None, 8, "softmax", True, 1.0)
    assert torch.equal(one[1], ref[1]) and bool(((one[0] - ref[0]).abs() <= 2 * A * ref[0].abs()).all())


@kernel_test
@pytest.mark.parametrize("case", grid(list(ROUTE_CASES), ["softmax_norm_bias"]))
@pytest.mark.parametrize("block_t,warps", grid([(16, 4), (4, 1), (64, 8)], [(16, 4), (4, 1)]))
def test_rows_kernel_same_experts_as_topk_kernel(case: str, block_t: int, warps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two route kernels (K rounds of a row max over a tile of tokens; route_topk's sort
    per token) choose the same experts, bitwise, also on exact ties and NaN tokens; gate
    values within 2A (other summation trees). Any tile shape and warps, a tail tile."""
    score, norm, bias_on, scale = ROUTE_CASES[case]
    lg = (torch.randn(70, 128, generator=torch.Generator().manual_seed(8)) * 2).to(DEV)
    lg[3] = 0.0  # every expert tied
    lg[4, 10:20] = 9.0  # ten tied for eight places
    lg[5] = float("nan")
    bias = _bias(128, bias_on)
    monkeypatch.setitem(fr.LAUNCH, "kernel", "topk")
    ref = _route(lg, bias, 8, score, norm, scale)
    monkeypatch.setitem(fr.LAUNCH, "kernel", "rows")
    monkeypatch.setitem(fr.LAUNCH, "block_t", block_t)
    monkeypatch.setitem(fr.LAUNCH, "rows_warps", warps)
    got = _route(lg, bias, 8, score, norm, scale)
    assert torch.equal(got[1], ref[1])
    if bias is None:  # (a bias breaks the ties)
        assert got[1][3].tolist() == list(range(8)) and got[1][4].tolist() == list(range(10, 18))
    assert got[1][5].tolist() == list(range(8))  # NaN: every lane -inf, the lowest ids
    ok = ((got[0] - ref[0]).abs() <= 2 * A * ref[0].abs()) | (got[0].isnan() & ref[0].isnan())
    assert bool(ok.all())


@kernel_test
def test_ties_go_to_the_lowest_ids() -> None:
    lg = torch.zeros(4, E)
    lg[1, [3, 5, 9, 12, 14]] = 1.0  # five tied for K=4 places: the four lowest
    lg[2, 7] = 2.0
    lg[2, [2, 6]] = 1.0
    lg[2, [1, 4, 11]] = 0.5  # the K-th place tied three ways: 1 wins
    lg[3] = -3.0  # all tied
    w, ids = _route(lg.to(DEV), None, K, "softmax", True, 1.0)
    assert ids.cpu().tolist() == [[0, 1, 2, 3], [3, 5, 9, 12], [1, 2, 6, 7], [0, 1, 2, 3]]
    assert torch.allclose(w[0].cpu(), torch.full((K,), 0.25), rtol=2 * A, atol=0)
    # Ties made by the bias: experts 5 and 6 tie (score + bias) for the last place.
    bias = torch.zeros(E)
    lg2 = torch.zeros(1, E)
    lg2[0, :3] = 5.0
    bias[5] = bias[6] = 0.25  # sigmoid(0) + 0.25 = 0.75 exactly, for both
    _, ids2 = _route(lg2.to(DEV), bias.to(DEV), K, "sigmoid", False, 1.0)
    assert ids2.cpu().tolist() == [[0, 1, 2, 5]]


@kernel_test
def test_nan_token_routes_to_k_distinct_experts_others_untouched() -> None:
    """NaN logits (a broken input, debug mode off) rank as -inf: the token still gets K
    distinct experts (its gate values are NaN); every other token's route is its own
    (bitwise: a token's route reads only its logits)."""
    lg = torch.randn(7, E, generator=torch.Generator().manual_seed(4)).to(DEV)
    ref = _route(lg, None, K, "softmax", True, 1.0)
    lg[3] = float("nan")
    lg[5, 2] = float("nan")
    w, ids = _route(lg, None, K, "softmax", True, 1.0)
    for t in (3, 5):
        assert ids[t].cpu().tolist() == list(range(K)) and bool(torch.isnan(w[t]).all())
    keep = [0, 1, 2, 4, 6]
    assert torch.equal(ids[keep], ref[1][keep]) and torch.equal(w[keep], ref[0][keep])
    # sigmoid: a NaN logit ranks last, the rest route normally
    ws, ids_s = _route(lg[5:6], None, K, "sigmoid", False, 1.0)
    assert 2 not in ids_s[0].tolist() and bool(torch.isfinite(ws).all())


@kernel_test
def test_zero_tokens() -> None:
    w, ids = _route(torch.empty(0, E, device=DEV), None, K, "softmax", True, 1.0)
    assert w.shape == (0, K) and ids.shape == (0, K) and ids.dtype == torch.int64


# ------------------------------------------------------------------ router and layer


def _layers(score: str = "softmax", norm: bool = True, bias: bool = False, **kw: Any) -> sm.MoE:
    cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func=score,  # type: ignore[arg-type]
                       route_norm=norm, route_scale=1.5 if score == "sigmoid" else 1.0,
                       load_balance_coeff=1e-3 if bias else None, param_dtype=DT, **kw)
    m = sm.MoE(cfg, device=DEV)
    m.init_states(seed=5, std=0.3)
    if m.cfg.param_dtype == torch.float32:  # the interpreter's stand-in: bf16 values
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    if bias:
        assert m.expert_bias_E is not None
        m.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E, device=DEV))
    return m


def _x(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(DT).to(DEV)


def _delta(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """delta_t of the module docstring."""
    return D * 2.0**-23 * (x.double().abs() @ w.double().abs().T).max(-1).values.cpu()


@kernel_test
@pytest.mark.parametrize("T", grid([1, 65, 200], [200]))
@pytest.mark.parametrize("case", ["softmax_norm", "sigmoid_bias"])
@pytest.mark.parametrize("kernel", ["rows", "topk", "fused"])
def test_router_matches_torch_router_and_float64(T: int, case: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each route kernel ("fused": the gate GEMM inside, in tl.dot's order) against the
    torch router and float64, with the GEMM's delta_t."""
    monkeypatch.setitem(fr.LAUNCH, "kernel", kernel)
    sig = case.startswith("sigmoid")
    m = _layers("sigmoid" if sig else "softmax", norm=not sig, bias="bias" in case)
    x = _x(T, seed=T)
    with torch.no_grad():
        bias = m._expert_bias()
        got = m.router.fast_route(x, bias)
        assert got is not None
        w_t, ids_t, _ = m.router._route(x, bias, m.router.gate.weight)  # the torch router
    w, ids = got
    gw = m.router.gate.weight
    logits64 = x.double() @ gw.double().T
    flips = _check_routes(w, ids, logits64, _delta(x, gw), bias, m.cfg.score_func, m.cfg.route_norm, m.cfg.route_scale)
    srt, order = ids_t.sort(-1)
    same_T = (srt == ids).all(-1)
    assert int((~same_T).sum()) <= flips, "the torch router and the kernel disagree beyond near-ties"
    w_perm = w_t.gather(-1, order)
    # both within the float64 tolerance: within twice it of each other
    tol = (8 * _delta(x, gw)[:, None].to(w.device) + 4 * A) * w_perm.abs() + 2.0**-20
    assert bool(((w - w_perm).abs() <= tol)[same_T].all())


@kernel_test
@pytest.mark.parametrize("T,bias", [(65, False), (129, True), (97, False)])
def test_layer_fast_router_on_vs_off(T: int, bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer with the fast router (taken: counted) vs FAST_ROUTER off (the torch router
    and the per-token sort): the same routes (counts), outputs within the docstring's
    tolerance. T > 64: on CUDA smaller T take the decode kernels."""
    m = _layers(bias=bias)
    x = _x(T, seed=1)
    calls = {"n": 0}
    real = fr.route_logits

    def counting(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(fr, "route_logits", counting)
    with torch.no_grad():
        y = m(x)
        c_fast = m.tokens_per_expert_E.clone()
        assert calls["n"] == 1
        monkeypatch.setattr(fr, "FAST_ROUTER", False)
        m.tokens_per_expert_E.zero_()
        y_ref = m(x)
        assert calls["n"] == 1
    assert torch.equal(c_fast, m.tokens_per_expert_E), "routing differs"
    assert float(c_fast.sum()) == T * K
    scale = float(y_ref.abs().max())
    err = float((y.double() - y_ref.double()).abs().max())
    print(f"layer T={T}: fast router vs torch router max diff {err:.3g} ({err / scale:.3g} of max|y|)")
    assert err <= ((K + 1) * 2.0**-7 if DT == torch.bfloat16 else 2.0**-15) * scale


@kernel_test
def test_not_taken_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, kernels='torchtitan', debug and batch-invariant mode, expert groups,
    routing replay (recorded/forced), FAST_ROUTER off: the torch router."""
    m = _layers()
    x = _x(70)
    calls = {"n": 0}
    real = fr.route_logits

    def counting(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(fr, "route_logits", counting)
    m(x)  # training (parameters require grad)
    with torch.no_grad():
        with sm.debug():
            m(x)
        with sm.batch_invariant_mode():
            m(x)
        m.record_routes = True
        m(x)
        m.record_routes = False
        m.forced_routes_TK = m.recorded_routes[0]
        m(x)
        m.forced_routes_TK = None
        tt = _layers(kernels="torchtitan")
        tt(x)
        grp = _layers(num_expert_groups=4, num_limited_groups=2)
        grp(x)
        monkeypatch.setattr(fr, "FAST_ROUTER", False)
        m(x)
        assert calls["n"] == 0
        monkeypatch.setattr(fr, "FAST_ROUTER", True)
        m(x)  # the control
    assert calls["n"] == 1


def test_cpu_layer_without_opt_in_keeps_torch_router(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPMD_MOE_FAST_ROUTE_INTERPRET", raising=False)
    x = torch.randn(4, 8)
    assert not fr.applies("fast", x, torch.randn(16, 8), groups=False)
    if ON_CUDA:
        xb = x.cuda().bfloat16()
        assert fr.applies("fast", xb, torch.randn(16, 8, device="cuda", dtype=torch.bfloat16), groups=False)
        assert not fr.applies("fast", xb.float(), torch.randn(16, 8, device="cuda"), groups=False)  # fp32 layer
        assert not fr.applies("torchtitan", xb, torch.randn(16, 8, device="cuda", dtype=torch.bfloat16), groups=False)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA: the bf16 GEMM with fp32 output")
def test_cuda_logits_within_the_fp32_gemm_bound() -> None:
    """torch.mm(bf16, bf16, out_dtype=fp32) (or the fallback) vs float64: within delta_t
    (the same exact products, summed in fp32; module docstring). Prints which GEMM ran."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 2048, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(128, 2048, generator=g) * 0.02).to(torch.bfloat16).cuda()
    lg = fr.logits(x, w)
    assert lg.dtype == torch.float32
    print(f"fast_route: torch.mm out_dtype=float32 available: {fr._mm_dtype_ok}")
    ref = x.double() @ w.double().T
    bound = 2048 * 2.0**-23 * (x.double().abs() @ w.double().abs().T)
    assert bool(((lg.double() - ref).abs() <= bound).all())


def test_one_histogram_per_call_on_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank: the layer's load-balance counter reuses the dispatcher's per-expert counts
    (the same ids; no second histogram) and still counts every routed slot."""
    import spmd_moe.moe as moe_mod
    from spmd_moe.dispatch.base import count_ids

    cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, load_balance_coeff=1e-3)
    m = sm.MoE(cfg)
    m.init_states(seed=1)
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(3))

    def no_second_histogram(*a: Any, **kw: Any) -> Any:
        raise AssertionError("MoE._count made its own histogram")

    monkeypatch.setattr(moe_mod, "count_ids", no_second_histogram)
    with torch.no_grad():
        m(x)
        _, ids, _ = m.router(x, m.expert_bias_E)
    assert torch.equal(m.tokens_per_expert_E, count_ids(ids, E + 1)[:E].float())
