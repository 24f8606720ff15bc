"""spmd_moe.kernels.gather_gemm (the prefill up projection that gathers its own A rows,
SwiGLU in the epilogue) against a float64 loop and the unfused path it replaces, and the
layer that takes it (CUDA inference, kernels='fast').

On CUDA the kernel runs on bf16 tensors. On CPU it runs in Triton's interpreter (this file
re-runs itself in a subprocess with TRITON_INTERPRET=1), which cannot load bf16: there the
kernel cases feed fp32 tensors holding bf16 values with bf16_math=True (the kernel rounds
where the bf16 GPU path rounds).

Tolerances, and why (u = 2^-8, bf16's unit roundoff; one bf16 ulp is at most 2^-7 relative):
* Against float64: a1 = x.w1 and a3 = x.w3 are fp32 sums over D (within D * 2^-24 *
  sum|x w| of exact), each rounded to bf16 (u), silu rounded (u), the product rounded (u).
  A relative error u in a1 moves silu(a1) by at most u * |a1| * max|silu'| (<= 1.1 |a1| u),
  so |h - exact| <= (2u * |silu(a1)| + 1.1 u * |a1|) * |a3| + u * |silu(a1) a3|
  + |silu(a1)| * u|a3| + the fp32 sums' error: we allow 4u * (|silu(a1)| + 1.1 |a1|) * |a3|
  computed from the exact a1, a3, plus 2^-20 * sum|x||w| terms for the fp32 sums.
* Against the unfused path on CUDA (gather + cutlass grouped GEMMs + the SwiGLU kernel): the
  same rounding points; only the fp32 summation order over D differs, so a1 or a3 differs
  by one bf16 ulp where its fp32 sum sits at a rounding boundary: h within the float64
  tolerance above of the unfused h, and at most 2% of the elements differ at all (a
  kernel that skipped a rounding point, or read a wrong row, differs on most).
* The layer (kernels='fast' with and without the fused projection, the same routes): the
  one-ulp a1/a3 flips pass through the down GEMM and the combine: outputs within 2^-8
  norm-relative on bf16; fp32 (interpreter, no rounding): 1e-5.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import spmd_moe as sm
from spmd_moe.dispatch.local import LocalDispatcher
from spmd_moe.kernels import fast_route as fr
from spmd_moe.kernels import gather_gemm as gg
from spmd_moe.parallel import ParallelContext
from triton_interp import interpreting, rerun, triton_ok

ON_CUDA = torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when it is first imported: on CPU this file re-runs itself.
IN_INTERPRETER = interpreting("SPMD_MOE_GATHER_GEMM_INTERPRET")
pytestmark = pytest.mark.skipif(not triton_ok(), reason="needs Triton (CUDA or its interpreter)")
kernel_test = pytest.mark.skipif(not ON_CUDA and not IN_INTERPRETER, reason="runs in the subprocess below")
DEV = "cuda" if ON_CUDA else "cpu"
U = 2.0**-8
# Small tiles in the interpreter (it runs every program in Python); the default on CUDA.
SMALL = {"BM": 16, "BN": 16, "BK": 16, "warps": 4, "stages": 2, "tma": 1}


@pytest.mark.skipif(ON_CUDA or IN_INTERPRETER, reason="CPU only, once")
def test_kernels_in_triton_interpreter() -> None:
    rerun(__file__, "SPMD_MOE_GATHER_GEMM_INTERPRET")


def _routed(T: int, D: int, Fd: int, E: int, K: int, case: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(x_TD, w1, w3, ids_TK, slots_R, counts_E, num_pad) as the layer makes them: bf16 values
    (fp32 tensors holding them in the interpreter), expert-sorted slots from the local
    dispatcher itself. case: 'random', 'one_expert' (every token on experts 0..K-1, the others
    empty), 'pad' (the last third of the tokens are padding)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16 if ON_CUDA else torch.float32
    x = torch.randn(T, D, generator=g).to(torch.bfloat16).to(dt)
    w1, w3 = ((torch.randn(E, Fd, D, generator=g) * D**-0.5).to(torch.bfloat16).to(dt) for _ in range(2))
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    if case == "one_expert":
        ids[:] = torch.arange(K)
    ids = ids.sort(-1).values
    num_pad = T // 3 if case == "pad" else 0
    if num_pad:
        ids[T - num_pad:] = E  # the layer's pad id: sorted last, never sent
    slots, counts, _ = LocalDispatcher(E, ParallelContext.single()).sorted_slots(ids.to(DEV), num_pad)
    return x.to(DEV), w1.to(DEV), w3.to(DEV), ids, slots, counts, num_pad


def _exact(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor,
           K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 h per sorted row (each row's token and expert read from the slot itself, one
    expert's rows at a time), and its tolerance (module docstring)."""
    x64, w164, w364 = x.double().cpu(), w1.double().cpu(), w3.double().cpu()
    slots = slots.cpu()
    xs = x64[slots // K]
    e_of = ids.reshape(-1)[slots]
    a1 = torch.zeros(slots.numel(), w1.shape[1], dtype=torch.float64)
    a3, sums = torch.zeros_like(a1), torch.zeros_like(a1)
    for e in e_of.unique().tolist():
        m = e_of == e
        a1[m], a3[m] = xs[m] @ w164[e].t(), xs[m] @ w364[e].t()
        sums[m] = (xs[m].abs() @ w164[e].abs().t()) * 2.0**-20
    s1 = a1 * torch.sigmoid(a1)
    tol = 4 * U * (s1.abs() + 1.1 * a1.abs()) * a3.abs() + sums * (a3.abs() + a1.abs() + sums)
    return s1 * a3, tol


def _excess(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor) -> float:
    """max |got - want| / tol (<= 1: within tolerance)."""
    d = (got.double().cpu() - want).abs()
    return float((d / (tol + 1e-300)).max()) if d.numel() else 0.0


# (T, D, F, E, K, case): T=0, T=1, odd T, one expert per slot taking every token (the others
# empty), padding, D not a multiple of BK (the masked K loop), F not a multiple of BN.
CASES = [(0, 32, 32, 4, 2, "random"), (1, 32, 32, 4, 2, "random"), (37, 64, 48, 5, 2, "random"),
         (33, 48, 40, 6, 3, "one_expert"), (30, 40, 32, 4, 2, "pad"), (70, 64, 32, 3, 1, "random")]


@kernel_test
@pytest.mark.parametrize("tma", [1, 0])
@pytest.mark.parametrize("T,D,Fd,E,K,case", CASES)
def test_kernel_against_float64(T: int, D: int, Fd: int, E: int, K: int, case: str, tma: int) -> None:
    """Both kernels: weight tiles by TMA descriptors (the default) and by pointers."""
    x, w1, w3, ids, slots, counts, num_pad = _routed(T, D, Fd, E, K, case, seed=T + D)
    assert slots.numel() == (T - num_pad) * K and int(counts.sum()) == slots.numel()
    launch = dict(SMALL if not ON_CUDA else gg.LAUNCH, tma=tma)
    h = gg.gathered_swiglu(x, slots, counts, w1, w3, K, launch=launch, bf16_math=True)
    assert h.shape == (slots.numel(), Fd) and h.dtype == x.dtype
    want, tol = _exact(x, w1, w3, ids, slots, K)
    assert _excess(h, want, tol) <= 1.0
    if T >= 30:  # the control: the rows of another token (a wrong gather) are far outside
        wrong, _ = _exact(x, w1, w3, ids, slots.roll(K), K)
        assert _excess(h, wrong, tol) > 1.0


@kernel_test
def test_kernel_without_rounding_is_fp32_math() -> None:
    """bf16_math=False (fp32 tensors): no bf16 rounding anywhere: within fp32 sums' error of
    float64 (the bf16 tolerance would hide a stray rounding; this one does not)."""
    if ON_CUDA:
        pytest.skip("fp32 operands: the interpreter's case (the GPU path is bf16)")
    x, w1, w3, ids, slots, counts, _ = _routed(37, 64, 48, 5, 2, "random", seed=1)
    h = gg.gathered_swiglu(x, slots, counts, w1, w3, 2, launch=SMALL, bf16_math=False)
    want, _ = _exact(x, w1, w3, ids, slots, 2)
    assert float((h.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    h_r = gg.gathered_swiglu(x, slots, counts, w1, w3, 2, launch=SMALL, bf16_math=True)
    assert float((h_r.double() - want).abs().max()) > 1e-4 * float(want.abs().max())  # rounding shows


@pytest.mark.skipif(not ON_CUDA, reason="the cutlass grouped GEMMs it replaces run on CUDA")
@pytest.mark.parametrize("launch", [None, {"BM": 64, "BN": 128, "BK": 64, "warps": 4, "stages": 3, "tma": 0}])
def test_kernel_against_unfused_cuda(launch: dict[str, int] | None) -> None:
    """The bf16 kernel against gather + cutlass grouped GEMMs + the SwiGLU kernel on the same
    slots (module docstring), at a layer-like size with skewed experts."""
    from spmd_moe.experts import grouped_mm
    from spmd_moe.kernels import fused_bwd as fb

    T, D, Fd, E, K = 999, 256, 192, 16, 4
    x, w1, w3, ids, slots, counts, _ = _routed(T, D, Fd, E, K, "random", seed=7)
    h = gg.gathered_swiglu(x, slots, counts, w1, w3, K, launch=launch)
    xr = x[slots // K]
    ref = fb.swiglu_forward(grouped_mm(xr, w1, counts, zero_tail=False), grouped_mm(xr, w3, counts, zero_tail=False))
    want, tol = _exact(x, w1, w3, ids, slots, K)
    assert _excess(ref, want, tol) <= 1.0  # the reference itself within the float64 tolerance
    assert _excess(h, want, tol) <= 1.0
    frac = float((h != ref).float().mean())
    print(f"gather_gemm vs unfused: {frac:.4%} of elements differ")
    assert frac <= 0.02


def _layers(dt: torch.dtype) -> sm.MoE:
    cfg = sm.MoEConfig(dim=64, hidden_dim=48, num_experts=6, top_k=2, score_func="softmax", route_norm=True,
                       param_dtype=dt, kernels="fast")
    moe = sm.MoE(cfg, device=DEV)
    moe.init_states(seed=3, std=0.3)
    return moe


@kernel_test
@pytest.mark.parametrize("T", [1, 45])
def test_layer_takes_it_in_inference(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels='fast' inference calls the fused projection once per forward, and its output
    agrees with the same layer without it (GATHER_GEMM off: gather + GEMMs + SwiGLU) within the
    layer tolerance; training and debug mode never take it."""
    monkeypatch.setattr(fr, "FAST_ROUTER", False)  # the same routes both ways
    dt = torch.bfloat16 if ON_CUDA else torch.float32
    moe = _layers(dt)
    calls = {"n": 0}
    real = gg.gathered_swiglu

    def counting(*a: object, **kw: object) -> torch.Tensor:
        calls["n"] += 1
        if not ON_CUDA:
            kw["launch"] = SMALL
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(gg, "gathered_swiglu", counting)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T)).to(dt).to(DEV)
    # T=1 on CUDA takes the decode kernels (spmd_moe.kernels.decode): not this path.
    decode_kernels = ON_CUDA and T <= 64
    if decode_kernels:
        monkeypatch.setattr(moe, "_decode_kernel_applies", lambda x_TD: False)
    with torch.no_grad():
        y = moe(x)
        assert calls["n"] == 1
        monkeypatch.setattr(gg, "GATHER_GEMM", False)
        y_off = moe(x)
        assert calls["n"] == 1
    monkeypatch.setattr(gg, "GATHER_GEMM", True)
    rel = float((y.double() - y_off.double()).norm() / y_off.double().norm())
    assert rel <= (2.0**-8 if dt == torch.bfloat16 else 1e-5), rel
    xg = x.clone().requires_grad_(True)
    moe(xg).sum().backward()  # training: the autograd path
    with sm.debug(), torch.no_grad():
        moe(x)
    assert calls["n"] == 1


# ------------------------------------------------------------------ EP: the fixed-size exchange
# With expert parallelism (the all-to-all dispatcher's fixed-size exchange, inference), the
# expert rank runs the same kernel on the rows it received, read through its slot order.
# Checked end to end on a real gloo world of 2 in the interpreter (with the partial-sum
# kernels' opt-ins): taken, no host read, and the output against the single-device layer
# (fp32, no rounding: 1e-5 relative, the GEMM sums in numpy's order instead of torch's).
IN_EP_INTERPRETER = interpreting("SPMD_MOE_GATHER_GEMM_INTERPRET", "SPMD_MOE_DECODE_INTERPRET")


@pytest.mark.skipif(ON_CUDA or IN_INTERPRETER, reason="CPU only, once")
def test_ep_in_triton_interpreter() -> None:
    out = rerun(__file__, "SPMD_MOE_GATHER_GEMM_INTERPRET", "SPMD_MOE_DECODE_INTERPRET", "SPMD_MOE_FUSED_BWD_INTERPRET",
                k="interp_ep", timeout=600)
    assert "1 passed" in out, out[-2000:]


def _ep_end_to_end(rank: int, n: int) -> list[str]:
    import spmd_moe.dispatch.all_to_all as a2a
    from test_ep_overlap import count_host_reads
    from tp2ep_util import D as TD, build_pair, make_cfg, rel_err, world_pctx

    a2a.PARTIAL_ON_CPU = True
    calls = {"n": 0}
    real = gg.gathered_swiglu

    def counting(*a: object, **kw: object) -> torch.Tensor:
        calls["n"] += 1
        return real(*a, **dict(kw, launch=SMALL))  # type: ignore[arg-type]

    gg.gathered_swiglu = counting  # type: ignore[assignment]
    bad = []
    try:
        for layout, T, skew, chunks in (("sequence", 7, "none", 1), ("sequence", 24, "one_rank", 1),
                                        ("replicated", 13, "one_expert", 1), ("sequence", 16, "none", 2)):
            cfg = make_cfg(dispatcher="all_to_all", padding="pad", top_k=4, kernels="fast", ep_chunks=chunks,
                           load_balance_coeff=1e-3 if skew != "none" else None)
            full, moe = build_pair(cfg, world_pctx(), layout, 90 + T, skew=skew)
            moe.prefill_dispatcher.equal_tokens = True
            x_all = torch.randn(n * T if layout == "sequence" else T, TD, generator=torch.Generator().manual_seed(T))
            sl = slice(rank * T, (rank + 1) * T) if layout == "sequence" else slice(0, T)
            with torch.no_grad():
                moe(x_all[sl])  # first call: the header exchange
                before = calls["n"]
                with count_host_reads() as reads:
                    y = moe(x_all[sl])
                taken = calls["n"] - before
                gg.GATHER_GEMM = False
                y_off = moe(x_all[sl])
                gg.GATHER_GEMM = True
                err, err_off = rel_err(y, full(x_all)[sl]), rel_err(y, y_off)
            if err > 1e-5 or err_off > 1e-5 or sum(reads.values()) or taken != chunks:
                bad.append(f"{layout} T={T} {skew} chunks={chunks}: rel err {err:.3g} (vs unfused {err_off:.3g}), "
                           f"{sum(reads.values())} host reads, kernel calls {taken}")
    finally:
        a2a.PARTIAL_ON_CPU = False
        gg.gathered_swiglu = real  # type: ignore[assignment]
    return bad


@pytest.mark.skipif(not IN_EP_INTERPRETER, reason="runs in the interpreter subprocess above")
def test_interp_ep_fixed_exchange_takes_it() -> None:
    from dist_utils import run_distributed

    res = run_distributed(_ep_end_to_end, 2, timeout=500, pg_timeout=300)
    bad = [f"rank {r}: {b}" for r, bs in enumerate(res) for b in bs]
    assert not bad, "\n".join(bad)
