"""spmd_moe.kernels.decode (fused router + experts + combine for decode on one GPU)
against the torch path (MoEConfig.kernels='torchtitan') and a float64 loop.

On CUDA the kernels run in bf16. On CPU they run in Triton's interpreter, which cannot
load bf16: there the tests feed fp32 tensors that hold bf16 values, and the kernels
round to bf16 wherever the GPU path does, so the same arithmetic is checked.

Tolerance: the kernels' GEMMs sum over D (or F) in another order than the torch GEMMs,
so the bf16-rounded GEMM outputs can differ by one bf16 ulp (2^-8 relative) and that
carries through SwiGLU, the down projection and the combine: we allow 3 bf16 ulps of the
output's scale (3 * 2^-8 * max|y|) against the torch path, and against the float64
loop (which rounds nothing) 6 ulps. Routing is compared exactly (the per-expert counts);
the random inputs leave no near-ties at fp32 resolution.
"""

from __future__ import annotations


import pytest
import torch

import spmd_moe as sm
from spmd_moe.kernels import decode as dk
from triton_interp import interpreting, rerun, triton_ok

ON_CUDA = torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when it is first imported, which in a pytest process has
# long happened: on CPU this file re-runs itself in a fresh interpreter with it set.
IN_INTERPRETER = interpreting("SPMD_MOE_DECODE_INTERPRET")
pytestmark = pytest.mark.skipif(not ON_CUDA and not triton_ok(), reason="needs CUDA or Triton's interpreter")
kernel_test = pytest.mark.skipif(not ON_CUDA and not IN_INTERPRETER, reason="runs in the subprocess below")

D, F, E, K = 64, 32, 16, 4


@pytest.mark.skipif(ON_CUDA or IN_INTERPRETER, reason="CPU only, once")
def test_kernels_in_triton_interpreter() -> None:
    rerun(__file__, "SPMD_MOE_DECODE_INTERPRET", timeout=600)


def _dev_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if ON_CUDA else ("cpu", torch.float32)


def _pair(score_func: str, route_norm: bool, bias: bool, shared: bool) -> tuple[sm.MoE, sm.MoE]:
    """(fast, reference): the same weights; the reference runs the torch path in bf16,
    the fast one the kernels (in fp32 tensors holding bf16 values on the interpreter)."""
    dev, dt = _dev_dtype()
    out = []
    for kernels, pdt in (("fast", dt), ("torchtitan", torch.bfloat16)):
        cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func=score_func,  # type: ignore[arg-type]
                           route_norm=route_norm, route_scale=1.5 if score_func == "sigmoid" else 1.0,
                           load_balance_coeff=1e-3 if bias else None, shared_hidden_dim=32 if shared else None,
                           param_dtype=pdt, kernels=kernels)  # type: ignore[arg-type]
        out.append(sm.MoE(cfg, device=dev))
    fast, ref = out
    ref.init_states(seed=7, std=0.3)
    if bias:
        assert ref.expert_bias_E is not None
        ref.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E, device=dev))
    fast.load_state_dict(ref.state_dict())  # bf16 -> fp32 is exact
    return fast, ref


def _run(fast: sm.MoE, ref: sm.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return fast(x), ref(x.to(torch.bfloat16))


def _x(T: int, seed: int = 0) -> torch.Tensor:
    dev, dt = _dev_dtype()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(torch.bfloat16).to(dt).to(dev)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) * 2.0**-8
    return float((a.double() - b.double()).abs().max()) / scale


@kernel_test
@pytest.mark.parametrize("T", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("variant", ["softmax", "softmax_norm_bias", "sigmoid_norm_shared"])
def test_fast_decode_matches_torch_path(T: int, variant: str) -> None:
    score = "sigmoid" if variant.startswith("sigmoid") else "softmax"
    fast, ref = _pair(score, "norm" in variant, "bias" in variant, "shared" in variant)
    x = _x(T, seed=T)
    with torch.no_grad():
        assert fast._decode_kernel_applies(x) and not ref._decode_kernel_applies(x)
    y_fast, y_ref = _run(fast, ref, x)
    assert torch.equal(fast.tokens_per_expert_E, ref.tokens_per_expert_E), "routing differs"
    assert float(fast.tokens_per_expert_E.sum()) == T * K
    assert _ulps(y_fast, y_ref) <= 3.0, f"{_ulps(y_fast, y_ref):.2f} bf16 ulps from the torch path"


@kernel_test
def test_fast_decode_matches_float64_loop() -> None:
    fast, _ = _pair("softmax", True, False, False)
    T = 9
    x = _x(T, seed=3)
    with torch.no_grad():
        y = fast(x).double().cpu()
        xd = x.double().cpu()
        w_ED = fast.router.gate.weight.double().cpu()
        s_TE = torch.softmax(xd @ w_ED.T, -1)
        top = s_TE.topk(K, -1)
        wts = top.values / top.values.sum(-1, keepdim=True)
        ex = fast.experts
        w1, w2, w3 = (w.double().cpu() for w in (ex.w1_EFD, ex.w2_EDF, ex.w3_EFD))
        ref = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for k in range(K):
                e = int(top.indices[t, k])
                h = torch.nn.functional.silu(xd[t] @ w1[e].T) * (xd[t] @ w3[e].T)
                ref[t] += wts[t, k] * (h @ w2[e].T)
    assert _ulps(y, ref) <= 6.0


@kernel_test
def test_all_tokens_one_expert_and_idle_experts() -> None:
    """A bias that forces every token onto the same K experts: one expert takes T rows,
    all others none."""
    fast, ref = _pair("sigmoid", True, True, False)
    for m in (fast, ref):
        assert m.expert_bias_E is not None
        m.expert_bias_E.zero_()
        m.expert_bias_E[:K] = 100.0
    x = _x(64, seed=5)
    y_fast, y_ref = _run(fast, ref, x)
    assert fast.tokens_per_expert_E[:K].tolist() == [64.0] * K
    assert _ulps(y_fast, y_ref) <= 3.0


@kernel_test
def test_not_used_where_it_does_not_apply() -> None:
    fast, _ = _pair("softmax", False, False, False)
    with torch.no_grad():
        assert fast._decode_kernel_applies(_x(dk.MAX_T))
        assert not fast._decode_kernel_applies(_x(dk.MAX_T + 1))  # prefill sizes: grouped GEMMs
        with sm.debug():
            assert not fast._decode_kernel_applies(_x(4))  # debug mode checks the torch path
    assert not fast._decode_kernel_applies(_x(4))  # training: autograd needs the torch path


@kernel_test
def test_nan_token_still_routes_to_k_distinct_experts() -> None:
    """A NaN input (debug mode off) must not break the plan: its token goes to K distinct
    experts (its output is NaN), the other tokens are unaffected."""
    fast, ref = _pair("softmax", True, False, False)
    x = _x(6, seed=9)
    x[2] = float("nan")
    with torch.no_grad():
        y = fast(x)
    assert float(fast.tokens_per_expert_E.sum()) == 6 * K
    assert int(fast.tokens_per_expert_E.max()) <= 6
    assert bool(torch.isnan(y[2]).all())
    keep = [0, 1, 3, 4, 5]
    _, y_ref = _run(fast, ref, x[keep])
    assert _ulps(y[keep], y_ref) <= 3.0


def test_fp32_layer_never_takes_the_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the tests' opt-in lets the interpreter run fp32 tensors as bf16 stand-ins."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPMD_MOE_DECODE_INTERPRET", raising=False)
    with torch.no_grad():
        assert not dk.usable(torch.randn(4, 64), torch.randn(8, 32, 64))


try:  # a one-op kernel around the kernels' rounding helper (module level: Triton resolves globals)
    import triton
    import triton.language as tl

    from spmd_moe.kernels._decode_triton import rn_bf16

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def _round_kernel(a_ptr, o_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def, unused-ignore]
        r = tl.arange(0, N)
        tl.store(o_ptr + r, rn_bf16(tl.load(a_ptr + r)))
except ImportError:
    pass


@kernel_test
def test_rn_bf16_rounds_like_torch_nan_and_inf_included() -> None:
    """The kernels' bf16 rounding by hand equals torch's cast (nearest even), and a NaN
    with every mantissa bit set (the GPU's default NaN) stays NaN instead of carrying into
    the sign bit."""
    dev, _ = _dev_dtype()
    special = torch.tensor([0x7FFFFFFF, 0x7FC00000, -1, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0, -2147483648],
                           dtype=torch.int32).view(torch.float32)
    a = torch.cat([special, torch.randn(1016, generator=torch.Generator().manual_seed(0)) * 100]).to(dev)
    o = torch.empty_like(a)
    _round_kernel[(1,)](a, o, N=1024)
    ref = a.to(torch.bfloat16).float()
    same = (o == ref) | (torch.isnan(o) & torch.isnan(ref))
    assert bool(same.all()), f"{int((~same).sum())} of 1024 values round differently"


# ---- expert parallelism: a local range of experts, a range of counted rows, fp32 output ----

def _raw(T: int, seed: int) -> dict[str, torch.Tensor]:
    """Router and expert weights as bf16 values (fp32 tensors on the interpreter)."""
    dev, dt = _dev_dtype()
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 0.3) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * s).to(torch.bfloat16).to(dt).to(dev)

    return {"x": r(T, D, s=1.0), "gw": r(E, D), "w1": r(E, F, D), "w2": r(E, D, F), "w3": r(E, F, D)}


def _f64_reference(p: dict[str, torch.Tensor], bias: torch.Tensor | None, sigmoid: bool,
                   local: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_TD, ids_TK): every token routed over all E experts, only the experts in `local`
    summed, nothing rounded (route_norm on, route_scale 1.5 for sigmoid as below)."""
    xd, gw = p["x"].double().cpu(), p["gw"].double().cpu()
    logits = xd @ gw.T
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
    choice = scores + (bias.double().cpu() if bias is not None else 0.0)
    ids = choice.topk(K, -1).indices
    wts = scores.gather(-1, ids)
    wts = wts / wts.sum(-1, keepdim=True) * (1.5 if sigmoid else 1.0)
    w1, w2, w3 = (p[n].double().cpu() for n in ("w1", "w2", "w3"))
    y = torch.zeros(xd.shape[0], D, dtype=torch.float64)
    for t in range(xd.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            if e in local:
                h = torch.nn.functional.silu(xd[t] @ w1[e].T) * (xd[t] @ w3[e].T)
                y[t] += wts[t, k] * (h @ w2[e].T)
    return y, ids


def _call(p: dict[str, torch.Tensor], bias: torch.Tensor | None, sigmoid: bool, local: range | None = None,
          **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """routed_decode on the experts in `local` (all if None); returns (y, tokens_per_expert_E)."""
    tpe = torch.zeros(E, dtype=torch.float32, device=p["x"].device)
    sl = slice(None) if local is None else slice(local.start, local.stop)
    if local is not None:
        kw = dict(kw, expert_start=local.start, num_local=len(local))
    with torch.no_grad():
        y = dk.routed_decode(p["x"], p["gw"], bias, p["w1"][sl], p["w2"][sl], p["w3"][sl], top_k=K,
                             score_func="sigmoid" if sigmoid else "softmax", route_norm=True,
                             route_scale=1.5 if sigmoid else 1.0, tokens_per_expert_E=tpe, **kw)  # type: ignore[arg-type]
    return y, tpe


def _counts(ids_TK: torch.Tensor, rows: range) -> torch.Tensor:
    return torch.bincount(ids_TK[rows.start:rows.stop].flatten(), minlength=E).float()


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float buffer routed_decode allocates starts as NaN: a read of a y row that no
    kernel wrote (a non-local expert's slot) shows up in the output."""
    real = torch.empty

    def empty(*a: object, **k: object) -> torch.Tensor:
        out = real(*a, **k)  # type: ignore[call-overload]
        return out.fill_(float("nan")) if out.is_floating_point() else out  # type: ignore[no-any-return]

    monkeypatch.setattr(torch, "empty", empty)


@kernel_test
@pytest.mark.parametrize("T", [1, 5])
def test_local_experts_and_counted_rows_match_float64_loop(T: int, poisoned_empty: None) -> None:
    """Experts 4..11 of 16 on this 'rank', rows [1, T) (T=5) or [0, 1) counted: the output
    is the float64 loop restricted to those experts (fp32 unrounded and bf16 rounded), the
    counter holds the counted rows' routes over all E. Tolerance as in the module
    docstring: 6 bf16 ulps of the output scale against a loop that rounds nothing (the
    kernels round the GEMM outputs and SwiGLU to bf16, as the torch path)."""
    p = _raw(T, seed=20 + T)
    local = range(4, 12)
    rows = range(1, T) if T > 1 else range(0, 1)
    ref, ids = _f64_reference(p, None, False, local)
    assert float(ref.abs().max()) > 0  # some token has a local expert
    y32, tpe = _call(p, None, False, local, count_rows=(rows.start, rows.stop), out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    assert torch.equal(tpe.cpu(), _counts(ids, rows)), "count over count_rows, all E experts"
    assert _ulps(y32.cpu(), ref) <= 6.0
    y16, _ = _call(p, None, False, local)
    assert y16.dtype == p["x"].dtype
    assert _ulps(y16.double().cpu(), ref) <= 6.0
    none_local = [t for t in range(T) if not any(int(e) in local for e in ids[t])]
    for t in none_local:  # every expert of the token elsewhere: exact zeros, fp32 and rounded
        assert not bool(y32[t].any()) and not bool(y16[t].any())


@kernel_test
def test_two_fake_ranks_add_up_to_the_layer(poisoned_empty: None) -> None:
    """T=7 (odd) split as EP=2 would: experts [0, 8) and [8, 16), counted rows [0, 4) and
    [4, 7). The fp32 partial sums add up to the float64 loop over all experts (6 ulps, as
    above) and the two counters to the one-rank counter exactly."""
    T = 7
    p = _raw(T, seed=31)
    ref, _ = _f64_reference(p, None, False, range(E))
    ya, ca = _call(p, None, False, range(0, 8), count_rows=(0, 4), out_dtype=torch.float32)
    yb, cb = _call(p, None, False, range(8, 16), count_rows=(4, 7), out_dtype=torch.float32)
    _, c_all = _call(p, None, False)
    assert torch.equal(ca + cb, c_all) and float(c_all.sum()) == T * K
    assert _ulps((ya + yb).cpu(), ref) <= 6.0


@kernel_test
def test_every_token_on_the_same_experts(poisoned_empty: None) -> None:
    """A bias that sends all 9 tokens to experts 12..15: on a rank holding [8, 16) one
    expert takes every token and four local experts none; on a rank holding [0, 8) every
    token's experts are elsewhere and its output is exactly zero (fp32 and rounded), while
    it still counts all routes."""
    T = 9
    p = _raw(T, seed=41)
    bias = torch.zeros(E, device=p["x"].device)
    bias[12:] = 100.0
    ref, ids = _f64_reference(p, bias, True, range(8, 16))
    assert sorted(set(ids.flatten().tolist())) == [12, 13, 14, 15]
    y, tpe = _call(p, bias, True, range(8, 16))
    assert _ulps(y.double().cpu(), ref) <= 6.0
    assert tpe.cpu().tolist() == [0.0] * 12 + [float(T)] * 4
    for out_dtype in (None, torch.float32):
        y0, tpe0 = _call(p, bias, True, range(0, 8), out_dtype=out_dtype)
        assert torch.equal(y0, torch.zeros_like(y0)), "no local expert: exact zeros"
        assert torch.equal(tpe0, tpe)


@kernel_test
@pytest.mark.parametrize("T", [1, 6])
def test_default_arguments_are_the_whole_layer(T: int) -> None:
    """The defaults are the one-rank layer: bitwise the same as naming the full range,
    all rows and (on CUDA) bf16 output. (Bitwise equal to the kernels before these
    arguments existed, too: checked once on the interpreter, docs/performance.md.)"""
    p = _raw(T, seed=50 + T)
    y, c = _call(p, None, False)
    # The interpreter's fp32 tensors stand for bf16 ones: there out_dtype=None is the rounded sum.
    y_full, c_full = _call(p, None, False, range(0, E), count_rows=(0, T),
                           out_dtype=torch.bfloat16 if ON_CUDA else None)
    assert torch.equal(y, y_full) and torch.equal(c, c_full)


# ---- the split variant (small T): more, smaller programs; fp32 partials summed in order ----

def _use(monkeypatch: pytest.MonkeyPatch, variant: str, swiglu: str = "up") -> None:
    """Route every T through `variant`, with tiles small enough that the test shapes are
    split: up over 4 D chunks (2 F blocks), down over 2 F chunks (2 D blocks); SwiGLU in
    the up kernel's last program per block or in every down program."""
    if variant == "slot":
        _use_slot(monkeypatch)
        return
    monkeypatch.setitem(dk.SLOT, "on", False)  # (whatever the defaults: the variant named)
    monkeypatch.setitem(dk.SPLIT, "variant", variant)
    monkeypatch.setitem(dk.SPLIT, "max_t", dk.MAX_T)
    for key, v in {"up_f": 16, "up_d": 16, "up_split": 4, "down_n": 32, "down_f": 16, "down_split": 2,
                   "swiglu": swiglu, "gate_e": 2}.items():
        monkeypatch.setitem(dk.SPLIT_TILES, key, v)


@kernel_test
@pytest.mark.parametrize(("T", "variant", "swiglu"), [(1, "split", "down"), (3, "split_fused", "up")])
def test_split_variant_matches_torch_path(T: int, variant: str, swiglu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same tolerance as the tiled kernels (module docstring): each GEMM output is still
    one fp32 sum rounded once to bf16, only its K order differs from cuBLAS's."""
    _use(monkeypatch, variant, swiglu)
    fast, ref = _pair("softmax", True, True, False)
    x = _x(T, seed=60 + T)
    y_fast, y_ref = _run(fast, ref, x)
    assert torch.equal(fast.tokens_per_expert_E, ref.tokens_per_expert_E), "routing differs"
    assert _ulps(y_fast, y_ref) <= 3.0, f"{_ulps(y_fast, y_ref):.2f} bf16 ulps from the torch path"


@kernel_test
@pytest.mark.parametrize("T", [1, 3])
def test_split_variants_are_bitwise_the_same(T: int, monkeypatch: pytest.MonkeyPatch,
                                             poisoned_empty: None) -> None:
    """SwiGLU in the up kernel's last program or in every down program, the combine in
    its own kernel or in the down program that finishes a token's block: the same
    partials summed in the same order, so bitwise the same output, rounded and fp32, on a
    local range of experts (non-local slots exact zeros) too; within 6 ulps of the
    float64 loop over the local experts (module docstring)."""
    p = _raw(T, seed=70 + T)
    local = range(4, 12)
    ref, _ = _f64_reference(p, None, False, local)
    fp32, rounded = [], []
    for variant, swiglu in (("split", "down"), ("split", "up"), ("split_fused", "down"), ("split_fused", "up")):
        _use(monkeypatch, variant, swiglu)
        fp32.append(_call(p, None, False, local, out_dtype=torch.float32)[0])
        if swiglu == "up":
            rounded.append(_call(p, None, False, local)[0])
    assert all(torch.equal(fp32[0], y) for y in fp32[1:])
    assert torch.equal(rounded[0], rounded[1])
    assert _ulps(fp32[0].cpu(), ref) <= 6.0


@kernel_test
def test_split_fused_one_expert_takes_every_token(monkeypatch: pytest.MonkeyPatch, poisoned_empty: None) -> None:
    """test_every_token_on_the_same_experts on the fused split variant: tokens with no
    local expert get their zero rows from the route kernel (no down program touches them)."""
    _use(monkeypatch, "split_fused")
    T = 9
    p = _raw(T, seed=41)
    bias = torch.zeros(E, device=p["x"].device)
    bias[12:] = 100.0
    ref, _ = _f64_reference(p, bias, True, range(8, 16))
    y, tpe = _call(p, bias, True, range(8, 16), out_dtype=torch.float32)
    assert _ulps(y.cpu(), ref) <= 6.0
    y0, tpe0 = _call(p, bias, True, range(0, 8))
    assert torch.equal(y0, torch.zeros_like(y0)) and torch.equal(tpe0, tpe)


@pytest.mark.skipif(not ON_CUDA, reason="programmatic dependent launch: CUDA (sm90+) only")
@pytest.mark.parametrize(("T", "variant"), [(1, "tiled"), (5, "tiled"), (1, "split_fused"), (5, "split"),
                                            (1, "slot"), (5, "slot")])
def test_pdl_changes_no_bit_eager_or_in_a_graph(T: int, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LAUNCH['pdl'] only changes when the kernels launch: the output is bitwise the same
    with and without it, eager and replayed from a CUDA graph (where the launches
    overlap), on a local expert range and over all experts."""
    p = _raw(T, seed=80 + T)
    outs = []
    for pdl in (False, True):
        _use(monkeypatch, variant)
        monkeypatch.setitem(dk.LAUNCH, "pdl", pdl)
        outs.append([_call(p, None, False, loc, out_dtype=od)[0] for loc in (None, range(4, 12))
                     for od in (None, torch.float32)])
        static_x = p["x"].clone()
        g = torch.cuda.CUDAGraph()
        _call(dict(p, x=static_x), None, False)  # compiled before the capture
        with torch.cuda.graph(g):
            y_graph, _ = _call(dict(p, x=static_x), None, False)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        outs[-1].append(y_graph.clone())
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(outs[1][-1], outs[1][0]), "graph replay = eager"


# ---- the slot design: the router in one kernel, up and down per slot ----

def _use_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every T through the slot design, with tiles that split the test shapes: 4 gate
    programs per token (so the router's counter sees 4 arrivals), 2 F blocks and 2 D
    steps in up, 4 D blocks and 2 F steps in down."""
    monkeypatch.setitem(dk.SLOT, "on", True)
    monkeypatch.setitem(dk.SLOT, "max_t", dk.MAX_T)
    for key, v in {"gate_e": 4, "up_f": 16, "up_d": 32, "down_n": 16, "down_f": 16}.items():
        monkeypatch.setitem(dk.SLOT_TILES, key, v)


@kernel_test
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("variant", ["softmax_norm_bias", "sigmoid_norm_shared"])
def test_slot_matches_torch_path(T: int, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tolerance of the module docstring: each GEMM output is one fp32 sum rounded once to
    bf16 as the torch GEMMs', in another order."""
    _use_slot(monkeypatch)
    score = "sigmoid" if variant.startswith("sigmoid") else "softmax"
    fast, ref = _pair(score, True, "bias" in variant, "shared" in variant)
    x = _x(T, seed=90 + T)
    y_fast, y_ref = _run(fast, ref, x)
    assert torch.equal(fast.tokens_per_expert_E, ref.tokens_per_expert_E), "routing differs"
    assert float(fast.tokens_per_expert_E.sum()) == T * K
    assert _ulps(y_fast, y_ref) <= 3.0, f"{_ulps(y_fast, y_ref):.2f} bf16 ulps from the torch path"


@kernel_test
@pytest.mark.parametrize("T", [1, 5])
def test_slot_local_experts_and_counted_rows(T: int, monkeypatch: pytest.MonkeyPatch, poisoned_empty: None) -> None:
    """As test_local_experts_and_counted_rows_match_float64_loop, on the slot design:
    experts 4..11 of 16, some rows counted, fp32 and rounded output within 6 ulps of the
    float64 loop, tokens without a local expert exact zeros (no h or y row of a non-local
    slot is ever written: the poisoned buffers would show a read)."""
    _use_slot(monkeypatch)
    p = _raw(T, seed=20 + T)
    local = range(4, 12)
    rows = range(1, T) if T > 1 else range(0, 1)
    ref, ids = _f64_reference(p, None, False, local)
    y32, tpe = _call(p, None, False, local, count_rows=(rows.start, rows.stop), out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    assert torch.equal(tpe.cpu(), _counts(ids, rows)), "count over count_rows, all E experts"
    assert _ulps(y32.cpu(), ref) <= 6.0
    y16, _ = _call(p, None, False, local)
    assert _ulps(y16.double().cpu(), ref) <= 6.0
    for t in [t for t in range(T) if not any(int(e) in local for e in ids[t])]:
        assert not bool(y32[t].any()) and not bool(y16[t].any())


@kernel_test
def test_slot_every_token_on_the_same_experts(monkeypatch: pytest.MonkeyPatch, poisoned_empty: None) -> None:
    """All 9 tokens on experts 12..15: the rank holding [8, 16) is within 6 ulps of the
    float64 loop, the rank holding [0, 8) gives exact zeros and still counts every route."""
    _use_slot(monkeypatch)
    T = 9
    p = _raw(T, seed=41)
    bias = torch.zeros(E, device=p["x"].device)
    bias[12:] = 100.0
    ref, _ = _f64_reference(p, bias, True, range(8, 16))
    y, tpe = _call(p, bias, True, range(8, 16))
    assert _ulps(y.double().cpu(), ref) <= 6.0
    assert tpe.cpu().tolist() == [0.0] * 12 + [float(T)] * 4
    for out_dtype in (None, torch.float32):
        y0, tpe0 = _call(p, bias, True, range(0, 8), out_dtype=out_dtype)
        assert torch.equal(y0, torch.zeros_like(y0)), "no local expert: exact zeros"
        assert torch.equal(tpe0, tpe)


@kernel_test
def test_slot_counters_reset_and_calls_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's per-token counters live across calls: the routing program sets them
    back to 0, so a second call (T=6, then T=2 on the same counters) routes again and
    gives the same bits; the counters are all zero after each call."""
    _use_slot(monkeypatch)
    for T in (6, 2):
        p = _raw(T, seed=100 + T)
        y1, c1 = _call(p, None, False)
        assert not bool(dk._done_counters(p["x"].device).any())
        y2, c2 = _call(p, None, False)
        assert torch.equal(y1, y2) and torch.equal(c1, c2) and float(c1.sum()) == T * K


@kernel_test
def test_slot_nan_token_still_routes_to_k_distinct_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    _use_slot(monkeypatch)
    fast, ref = _pair("softmax", True, False, False)
    x = _x(6, seed=9)
    x[2] = float("nan")
    with torch.no_grad():
        y = fast(x)
    assert float(fast.tokens_per_expert_E.sum()) == 6 * K
    assert int(fast.tokens_per_expert_E.max()) <= 6
    assert bool(torch.isnan(y[2]).all())
    keep = [0, 1, 3, 4, 5]
    _, y_ref = _run(fast, ref, x[keep])
    assert _ulps(y[keep], y_ref) <= 3.0


@kernel_test
@pytest.mark.parametrize("sigmoid", [False, True])
def test_router_kernel_is_gate_plus_route_bitwise(sigmoid: bool) -> None:
    """router_kernel runs gate_kernel's GEMV (same tiles, same order; 2 D steps here) and
    route_kernel's routing on the same logits: logits, ids, weights and the counter are
    those of the two kernels, bitwise, and its per-token counters are back at zero."""
    ks = dk._build()
    assert ks is not None
    T = 5
    p = _raw(T, seed=110)
    dev = p["x"].device
    bias = torch.linspace(-0.05, 0.05, E, device=dev)
    kw = {"SIGMOID": sigmoid, "HAS_BIAS": True, "NORM": True}
    scale = 1.5 if sigmoid else 1.0
    outs = []
    for fused in (True, False):
        logits = torch.empty(T, E, device=dev)
        ids = torch.empty(T, K, dtype=torch.int32, device=dev)
        wts = torch.empty(T, K, device=dev)
        tpe = torch.zeros(E, device=dev)
        if fused:
            ks["router"][(T, E // 4)](p["x"], p["gw"], logits, dk._done_counters(dev), bias, ids, wts, tpe,
                                      D, E, scale, 1, T, K=K, BLOCK_EC=4, BLOCK_D=D // 2, BLOCK_E=E, **kw)
        else:
            plan = torch.empty(E + 1, dtype=torch.int32, device=dev)
            ks["gate"][(T, E // 4)](p["x"], p["gw"], logits, plan, D, E, E + 1, BLOCK_EC=4, BLOCK_D=D // 2,
                                    BLOCK_PLAN=16)
            ks["route"][(T,)](logits, bias, ids, wts, plan[:E], plan[E:], torch.empty(E, dtype=torch.int32, device=dev),
                              torch.empty(E, T, dtype=torch.int32, device=dev), tpe, T, E, scale, 0, E, 1, T,
                              torch.empty(T, dtype=torch.int32, device=dev), torch.empty(T, D, device=dev), D,
                              K=K, BLOCK_E=E, FUSED_COMBINE=False, **kw)
        outs.append((logits, ids, wts, tpe))
    for name, a, b in zip(("logits", "ids", "weights", "counter"), *outs):
        assert torch.equal(a, b), f"{name} differs"
    assert not bool(dk._done_counters(dev).any())

@kernel_test
def test_slot_is_bitwise_the_tiled_kernels_at_t1(monkeypatch: pytest.MonkeyPatch, poisoned_empty: None) -> None:
    """At T=1 with TILES' tiles, the slot design runs the tiled kernels' arithmetic (the
    same tl.dot tiles on the one row, the same combine): the same bits, rounded and fp32,
    over all experts and a local range."""
    p = _raw(1, seed=130)
    outs = []
    for slot in (False, True):
        monkeypatch.setitem(dk.SLOT, "on", slot)
        tiles = {"up_f": dk.TILES["up_f"], "up_d": dk.TILES["up_d"], "down_n": dk.TILES["down_n"],
                 "down_f": dk.TILES["down_f"]}
        for key, v in tiles.items():
            monkeypatch.setitem(dk.SLOT_TILES, key, v)
        outs.append([_call(p, None, False, loc, out_dtype=od)[0] for loc in (None, range(4, 12))
                     for od in (None, torch.float32)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
