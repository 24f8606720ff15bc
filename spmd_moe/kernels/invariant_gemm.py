"""Batch-invariant grouped GEMM in Triton (CUDA; Triton's interpreter for tests on CPU).

    y[r, n] = sum_k a[r, k] * w[g(r), n, k]        rows r grouped by g (ends_g cumulative)

Why a row's result cannot depend on the batch: one program computes a [BM, BN] tile of
one group's rows; it walks K in BK steps, always from k = 0 upwards, adding each step's
tl.dot into the same fp32 accumulator; there is no split-K and the tile shapes and
instruction choice are compile-time constants that depend on the dtype and role only
(no autotuning; the row count is not specialised on). Two tile choices do follow the
call (the router's large tiles past ROUTER_LARGE_ROWS rows, the decode form's 16-row
expert tiles); they rest on a row's bits not depending on the tile shape at all, which
the GPU tests check (see _router_config and _decode_tiles_note). In a tl.dot every
output element is the dot product of its own row of a with a column of w, so the other
rows of the tile (other tokens, or masked zeros) never enter a row's accumulation.
Masked K tails load zeros: adding +0 products is exact.

Used by spmd_moe.batch_invariant on CUDA for the grouped experts, the router GEMM and
the shared experts (G = 1), forward and input-gradient (the same kernel with w's strides
swapped). Weight gradients are sums over rows and use torch's grouped GEMM. Around the
GEMMs: route() (gate GEMM + one route program per token), grouped_swiglu() (fused up +
SwiGLU kernel, then the down GEMM) and routed_decode(), the one-rank inference form for
T <= DECODE_MAX_T that runs the same kernels over a device-side plan, with 16-row tiles.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import spmd_types as spmd
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_kernel: Any = None
_tried = False
#: Tests only: run the Triton path on CPU tensors (with TRITON_INTERPRET=1).
ON_CPU = False


def wants(x: torch.Tensor) -> bool:
    """Whether x's device takes the Triton path."""
    return x.is_cuda or (ON_CPU and x.device.type == "cpu")


def available() -> bool:
    """Triton importable (CUDA, or the interpreter with TRITON_INTERPRET=1)."""
    return _build() is not None


def _build() -> Any:
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    try:
        from spmd_moe.kernels.invariant_triton import grouped_gemm_kernel
    except ImportError:
        return None
    _kernel = grouped_gemm_kernel
    return _kernel


@functools.lru_cache(maxsize=None)  # read once per process (the environment is set before it starts)
def _config(dtype: torch.dtype, router: bool = False, up: bool = False, decode: bool = False) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages): a function of the dtype and the role only
    (never of the row count; the one exception, the router's large tiles, is
    _router_config's). SPMD_MOE_INVARIANT_TILES="BM,BN,BK,warps,stages" overrides
    the 16-bit one (benchmark sweeps; both sides of a parity check must use the same).
    The router's fp32 GEMM (E outputs, no tensor cores) takes small tiles: at decode
    sizes a [64, 64] tile put all of it on E/64 SMs (about 35 us at D=2048); its K loop
    (D long) is latency-bound there, so 4 stages keep 3 loads in flight. The fused
    up kernel (two accumulators, w1 and w3) takes half the columns: the same registers
    and shared memory as one GEMM tile (sm_90: 128 registers, no spill, vs 255 + spill
    at full width) and twice the programs at decode sizes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 32, 16, 4, 1
    if router:
        return _tiles_env("SPMD_MOE_INVARIANT_ROUTER_TILES", (16, 16, 64, 4, 4))
    if decode:  # routed_decode's expert tiles: see _decode_tiles_note
        if dtype == torch.float32:
            return (16, 32, 32, 4, 3) if up else (16, 64, 32, 4, 3)
        return _tiles_env("SPMD_MOE_INVARIANT_DECODE_UP_TILES" if up else "SPMD_MOE_INVARIANT_DECODE_TILES",
                          (16, 32, 64, 4, 4) if up else (16, 64, 64, 4, 4))
    if dtype == torch.float32:
        return (64, 32, 32, 4, 3) if up else (64, 64, 32, 4, 3)
    env = os.environ.get("SPMD_MOE_INVARIANT_TILES")
    bm, bn, bk, w, st = (int(v) for v in env.split(",")) if env else (128, 128, 64, 8, 3)
    return bm, (max(16, bn // 2) if up else bn), bk, w, st


def _tiles_env(name: str, default: tuple[int, int, int, int, int]) -> tuple[int, int, int, int, int]:
    env = os.environ.get(name)
    if not env:
        return default
    bm, bn, bk, w, st = (int(v) for v in env.split(","))
    return bm, bn, bk, w, st


#: Row counts above which the router's GEMM takes its large tiles (_router_config).
ROUTER_LARGE_ROWS = int(os.environ.get("SPMD_MOE_INVARIANT_ROUTER_ROWS", "256"))


@functools.lru_cache(maxsize=None)
def _router_large() -> tuple[int, int, int, int, int]:
    return _tiles_env("SPMD_MOE_INVARIANT_ROUTER_TILES_LARGE", (64, 64, 32, 4, 3))


def _router_config(R: int) -> tuple[int, int, int, int, int]:
    """The router's fp32 GEMM is the one GEMM whose tiles follow the row count: small
    tiles for decode (E outputs spread over E/16 programs), large ones past
    ROUTER_LARGE_ROWS rows (16 x 16 fp32 tiles are shared-memory bound at T = 32768:
    2.0x the normal layer there, H200 session 4). The bits cannot move with the tiles:
    an fp32 'ieee' tl.dot is lowered to FMA (no tensor cores), and Triton's FMA lowering
    computes each output element as ONE chain acc = fma(a_k, b_k, acc) over k in
    ascending order (triton FMADotUtility), whatever BM, BN, BK, warps or stages are;
    _acc walks the K blocks in ascending order too. A compiler fact, not one this code
    can enforce, so tests/test_batch_invariance_decode.py checks it on the GPU (every
    config pair, bitwise), as the decode-vs-general tests do across the switch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _config(torch.float32, router=True)
    return _router_large() if R > ROUTER_LARGE_ROWS else _config(torch.float32, router=True)


# _decode_tiles_note: routed_decode (T <= 64 tokens, so <= 64 rows per expert) runs the
# expert kernels with 16-row tiles; the general path's 128-row tiles computed ~30x the
# useful MMA work at T = 64 and left SMs idle at T = 1. A row's bits do not move with
# the tiles: in fp32 by the FMA chain (see _router_config); in bf16/fp16 each output
# element is the same sequence of MMA k-steps (K blocks ascending, the instruction's
# k16 step fixed by the dtype), whatever the row tile, column tile, warps or stages
# (wgmma at 64+ rows, mma.sync below). A hardware and compiler fact, not this code's:
# test_expert_tiles_same_bits_cuda checks every config pair bitwise on the GPU
# (measured equal on an H200, session 5), and the decode-vs-general tests check it
# end to end.


@functools.lru_cache(maxsize=None)
def _up_split() -> bool:
    # Default fused: faster than split at every T measured on the H200 (session 4 run6 sweep:
    # eager cost 1.10 vs 1.33x at T=1, 1.41 vs 1.62x at 64, 2.00 vs 2.24x at 32768).
    return os.environ.get("SPMD_MOE_INVARIANT_UP", "fused") == "split"


_kerns: dict[str, Any] = {}


def _kern(name: str) -> Any:
    """A kernel of spmd_moe.kernels.invariant_triton (after available())."""
    k = _kerns.get(name)
    if k is None:
        assert _build() is not None, "Triton is not installed"
        from spmd_moe.kernels import invariant_triton as kt

        k = _kerns[name] = getattr(kt, name)
    return k


@functools.lru_cache(maxsize=None)
def _gp(G: int) -> int:
    return max(16, 1 << max(0, G - 1).bit_length())


def _grid(R: int, BM: int, G: int, n_tiles: int, slots: bool) -> tuple[int]:
    """Programs of a grouped launch: group tiles (<= ceil(R/BM) + non-empty groups, and
    at most min(G, R) groups are non-empty) plus, for grouped rows, the tiles that zero
    rows past the last group (<= ceil(R/BM)); the programs past the real tiles exit."""
    mt = (R + BM - 1) // BM
    return ((mt + min(G, R) + (0 if slots else mt)) * n_tiles,)


def _launch(a_RK: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, ...], N: int,
            groups_g: torch.Tensor | None, out_dtype: torch.dtype, *, counts: bool = False, f32: bool = False,
            slots: torch.Tensor | None = None, a_div: int = 1, rows_out: int = 0,
            decode: bool = False) -> torch.Tensor:
    """groups_g None: one group of all rows (dense GEMM). Else cumulative ends of the
    groups (counts False) or their row counts (True). slots: a plan [G, S] of each
    group's slots (row s // a_div of a, row s of the output, rows_out rows out).
    f32: the router's GEMM (forward and input gradient): multiplied in fp32 whatever
    a's and w's dtypes, with the router's tiles."""
    kern = _kern("grouped_gemm_kernel")
    R, K = a_RK.shape
    y = torch.empty(rows_out if slots is not None else R, N, dtype=out_dtype, device=a_RK.device)
    if y.shape[0] == 0 or N == 0:
        return y
    if groups_g is not None and groups_g.numel() == 0:
        return y.zero_()
    BM, BN, BK, warps, stages = _router_config(R) if f32 else _config(a_RK.dtype, decode=decode)
    nt = (N + BN - 1) // BN
    if groups_g is None:
        ends, G, grid = y, 1, (((R + BM - 1) // BM) * nt,)
    else:
        ends, G = _i32(groups_g), groups_g.shape[0]
        grid = _grid(R if slots is None else rows_out, BM, G, nt, slots is not None)
    kern[grid](
        a_RK, w, y, ends, slots if slots is not None else ends,
        R if slots is None else 0, N, K, G, int(counts), int(slots is not None), a_div,
        slots.stride(0) if slots is not None else 0,
        a_RK.stride(0), a_RK.stride(1), w_strides[0], w_strides[1], w_strides[2], y.stride(0), y.stride(1),
        BM=BM, BN=BN, BK=BK, GP=_gp(G), F32=f32 or a_RK.dtype == torch.float32,
        DENSE=groups_g is None, num_warps=warps, num_stages=stages,
    )
    return y


def _i32(t: torch.Tensor) -> torch.Tensor:
    """Group sizes/ends and plans go to the kernels as int32 in every path: a pointer's
    element type is part of the compiled kernel's signature; one index type keeps
    every path on as few binaries as possible."""
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _ends(groups_g: torch.Tensor, counts: bool) -> torch.Tensor:
    return torch.cumsum(groups_g.to(torch.int64), 0) if counts else groups_g


def _grad_w(g_RN: torch.Tensor, x_RK: torch.Tensor, ends_g: torch.Tensor | None, w_GNK: torch.Tensor) -> torch.Tensor:
    """Per-group g.T @ x (a sum over the group's rows: not part of the invariance claim)."""
    if ends_g is None:
        if g_RN.dtype != x_RK.dtype:  # the router: fp32 gradient, 16-bit input
            return (g_RN.t().float() @ x_RK.float()).unsqueeze(0).to(w_GNK.dtype)
        return (g_RN.t() @ x_RK).unsqueeze(0).to(w_GNK.dtype)
    if g_RN.dtype == torch.bfloat16 and g_RN.is_cuda:
        from spmd_moe.experts import _per_expert_grad_w  # torch's grouped GEMM (bf16 on CUDA)

        return _per_expert_grad_w(g_RN, x_RK, ends_g.to(torch.int32), w_GNK)
    gw = torch.zeros_like(w_GNK)
    start = 0
    for e, end in enumerate(ends_g.tolist()):  # host sync: backward only
        if end > start:
            gw[e] = (g_RN[start:end].t() @ x_RK[start:end]).to(gw.dtype)
        start = end
    return gw


@spmd.register_local_autograd_function  # per-rank GEMMs, no communication: placements propagate
class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_RK: torch.Tensor, w_GNK: torch.Tensor, groups_g: torch.Tensor | None,
                counts: bool = False, f32: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x_RK, w_GNK)
        ctx.groups, ctx.counts, ctx.f32 = groups_g, counts, f32
        w = w_GNK
        out_dt = torch.float32 if f32 else x_RK.dtype
        return _launch(x_RK, w, (w.stride(0), w.stride(1), w.stride(2)), w.shape[1], groups_g, out_dt,
                       counts=counts, f32=f32)

    @staticmethod
    def backward(ctx: Any, g_RN: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        x_RK, w_GNK = ctx.saved_tensors
        groups, counts = ctx.groups, ctx.counts
        g_RN = g_RN.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            # gx[r, k] = sum_n g[r, n] * w[g, n, k]: the same kernel, w read as [G, K, N].
            w = w_GNK
            gx = _launch(g_RN, w, (w.stride(0), w.stride(2), w.stride(1)), w.shape[2], groups, x_RK.dtype,
                         counts=counts, f32=ctx.f32)
        if ctx.needs_input_grad[1]:
            gw = _grad_w(g_RN, x_RK, None if groups is None else _ends(groups, counts), w_GNK)
        return gx, gw, None, None, None


def grouped_linear(x_RK: torch.Tensor, w_GNK: torch.Tensor, ends_g: torch.Tensor | None, *,
                   counts: bool = False, f32: bool = False) -> torch.Tensor:
    """[R, K] rows grouped by ends_g (cumulative row counts; counts=True: per-group
    counts) times w[g].T -> [R, N]; rows past the last group come out zero; ends_g
    None: one group of all rows (G = 1). f32: in fp32 (out fp32) from any input dtype.
    Differentiable in x and w."""
    if not (torch.is_grad_enabled() and (x_RK.requires_grad or w_GNK.requires_grad)) and not spmd.is_type_checking():
        w = w_GNK  # inference: the kernel without the autograd Function's overhead
        return _launch(x_RK, w, (w.stride(0), w.stride(1), w.stride(2)), w.shape[1], ends_g,
                       torch.float32 if f32 else x_RK.dtype, counts=counts, f32=f32)
    out: torch.Tensor = _GroupedLinear.apply(x_RK, w_GNK, ends_g, counts, f32)  # type: ignore[no-untyped-call]
    return out


def linear(x_TK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, batch-invariant (G = 1); any leading dims."""
    lead = x_TK.shape[:-1]
    x2 = x_TK.reshape(-1, x_TK.shape[-1])
    return grouped_linear(x2, w_NK.unsqueeze(0), None).reshape(*lead, w_NK.shape[0])


def _up(x_RD: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, groups_e: torch.Tensor, *,
        counts: bool, save: bool, slots: torch.Tensor | None = None, a_div: int = 1,
        rows_out: int = 0, decode: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(h, a1, a3) of the up projections and SwiGLU; a1/a3 (w1 and w3 outputs) only if
    save. Default (SPMD_MOE_INVARIANT_UP unset or 'fused'; read once per process): the
    fused kernel; 'split': the w1 and w3 GEMMs as two launches of the grouped GEMM kernel
    (its 128x128 tiles) and torch's SiLU and product (elementwise). Either is the same for
    every T and path in a process (their bits differ from each other)."""
    if _up_split():
        s1, s3 = w1_EFD.stride(), w3_EFD.stride()
        a1s = _launch(x_RD, w1_EFD, s1, w1_EFD.shape[1], groups_e, x_RD.dtype, counts=counts, slots=slots,
                      a_div=a_div, rows_out=rows_out, decode=decode)
        a3s = _launch(x_RD, w3_EFD, s3, w3_EFD.shape[1], groups_e, x_RD.dtype, counts=counts, slots=slots,
                      a_div=a_div, rows_out=rows_out, decode=decode)
        return F.silu(a1s) * a3s, (a1s if save else None), (a3s if save else None)
    kern = _kern("swiglu_up_kernel")
    R, Dk = x_RD.shape
    E, Fh, _ = w1_EFD.shape
    n_out = rows_out if slots is not None else R
    dt = x_RD.dtype
    h = torch.empty(n_out, Fh, dtype=dt, device=x_RD.device)
    a1 = torch.empty_like(h) if save else None
    a3 = torch.empty_like(h) if save else None
    if n_out == 0 or Fh == 0:
        return h, a1, a3
    if E == 0:
        h.zero_()
        return h, (a1.zero_() if a1 is not None else None), (a3.zero_() if a3 is not None else None)
    assert w1_EFD.stride() == w3_EFD.stride()
    BM, BN, BK, warps, stages = _config(dt, up=True, decode=decode)
    nt = (Fh + BN - 1) // BN
    s = w1_EFD.stride()
    groups_e = _i32(groups_e)
    kern[_grid(n_out, BM, E, nt, slots is not None)](
        x_RD, w1_EFD, w3_EFD, h, a1 if a1 is not None else h, a3 if a3 is not None else h, groups_e,
        slots if slots is not None else groups_e,
        R if slots is None else 0, Fh, Dk, E, int(counts), int(slots is not None), a_div,
        slots.stride(0) if slots is not None else 0, int(save),
        x_RD.stride(0), x_RD.stride(1), s[0], s[1], s[2], h.stride(0), h.stride(1),
        BM=BM, BN=BN, BK=BK, GP=_gp(E), F32=dt == torch.float32, num_warps=warps, num_stages=stages,
    )
    return h, a1, a3


@spmd.register_local_autograd_function  # per-rank GEMMs, no communication: placements propagate
class _SwiGLUUp(torch.autograd.Function):
    """h = silu(x @ w1.T) * (x @ w3.T) per group in one kernel (the forward every
    invariant path runs); backward from the saved w1/w3 outputs: torch's elementwise
    ops and the invariant GEMM for the input gradient."""

    @staticmethod
    def forward(ctx: Any, x_RD: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor,
                counts_e: torch.Tensor) -> torch.Tensor:
        h, a1, a3 = _up(x_RD, w1_EFD, w3_EFD, counts_e, counts=True, save=True)
        ctx.save_for_backward(x_RD, w1_EFD, w3_EFD, counts_e, a1, a3)
        return h

    @staticmethod
    def backward(ctx: Any, gh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, w3, counts_e, a1, a3 = ctx.saved_tensors
        gh = gh.contiguous()
        # As autograd through F.silu(a1) * a3: the product's two gradients, then silu's.
        ga3 = gh * F.silu(a1)
        ga1 = torch.ops.aten.silu_backward(gh * a3, a1)
        gx = gw1 = gw3 = None
        if ctx.needs_input_grad[0]:
            gx = _launch(ga1, w1, (w1.stride(0), w1.stride(2), w1.stride(1)), w1.shape[2], counts_e, x.dtype,
                         counts=True) + _launch(ga3, w3, (w3.stride(0), w3.stride(2), w3.stride(1)), w3.shape[2],
                                                counts_e, x.dtype, counts=True)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ends = _ends(counts_e, True)
            gw1 = _grad_w(ga1, x, ends, w1)
            gw3 = _grad_w(ga3, x, ends, w3)
        return gx, gw1, gw3, None


def grouped_swiglu(x_RD: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor, w3_EFD: torch.Tensor,
                   counts_e: torch.Tensor) -> torch.Tensor:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) per expert group; rows of no expert come out zero.
    The up projections and SwiGLU are one kernel (fused_up), the down projection the
    grouped GEMM; the same kernels as the one-rank decode path (routed_decode)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_RD, w1_EFD, w3_EFD))
    if grad or spmd.is_type_checking():
        h: torch.Tensor = _SwiGLUUp.apply(x_RD, w1_EFD, w3_EFD, counts_e)  # type: ignore[no-untyped-call]
    else:
        h = _up(x_RD, w1_EFD, w3_EFD, counts_e, counts=True, save=False)[0]
    return grouped_linear(h, w2_EDF, counts_e, counts=True)


@spmd.register_local_autograd_function  # per-token, no communication: placements propagate
class _Route(torch.autograd.Function):
    """The route kernel's outputs as a function of the logits. Backward: the same
    formula in torch ops (softmax/sigmoid, gather at the chosen ids, renorm with the
    ordered sum, scale), differentiated by autograd: per-row ops."""

    @staticmethod
    def forward(ctx: Any, logits_TE: torch.Tensor, bias_E: torch.Tensor | None, top_k: int, sigmoid: bool,
                norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w, ids, scores = _route_kernel(logits_TE, bias_E, top_k, sigmoid, norm, scale)
        ctx.save_for_backward(logits_TE, ids)
        ctx.sigmoid, ctx.norm, ctx.scale = sigmoid, norm, scale
        ctx.mark_non_differentiable(ids)
        return w, ids, scores

    @staticmethod
    def backward(ctx: Any, gw: torch.Tensor | None, _gids: Any, gs: torch.Tensor | None) -> tuple[Any, ...]:
        logits, ids = ctx.saved_tensors
        with torch.enable_grad():
            lg = logits.detach().requires_grad_(True)
            scores = torch.sigmoid(lg) if ctx.sigmoid else F.softmax(lg, dim=-1)
            w = scores.gather(-1, ids)
            if ctx.norm:
                w = w / (ordered_sum_last(w, True) + 1e-20)
            if ctx.scale != 1.0:
                w = w * ctx.scale
            outs = [o for o, g in ((w, gw), (scores, gs)) if g is not None]
            grads = [g for g in (gw, gs) if g is not None]
            (gl,) = torch.autograd.grad(outs, [lg], grads) if outs else (torch.zeros_like(logits),)
        return gl, None, None, None, None, None


def _route_kernel(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, top_k: int, sigmoid: bool, norm: bool,
                  scale: float, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits_TE.shape
    dev = logits_TE.device
    scores = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    if T == 0:
        return w, ids, scores
    if plan is None:  # unread without a plan; the same pointer types as with one (one binary)
        dummy = torch.empty(1, dtype=torch.int32, device=dev)
        count, slots, tpe = dummy, dummy, w
    else:
        count, slots, tpe = plan
    _kern("route_kernel")[(T,)](
        logits_TE, bias_E if bias_E is not None else w, scores, ids, w, count, slots, tpe,
        T, E, float(scale), int(plan is not None),
        K=top_k, BLOCK_E=max(16, 1 << max(0, E - 1).bit_length()), SIGMOID=sigmoid, HAS_BIAS=bias_E is not None,
        NORM=norm, num_warps=4,
    )
    return w, ids, scores


def route(x_TD: torch.Tensor, w_ED: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, score_func: str,
          route_norm: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router, batch-invariantly: (weights_TK fp32, expert_ids_TK ascending,
    scores_TE fp32). Logits: the invariant GEMM in fp32 (x and the gate read in their
    dtype, multiplied in fp32); then one program per token (route_kernel)."""
    logits = grouped_linear(x_TD, w_ED.unsqueeze(0), None, f32=True)
    sig = score_func == "sigmoid"
    bias = bias_E.detach().contiguous() if bias_E is not None else None
    if torch.is_grad_enabled() and logits.requires_grad or spmd.is_type_checking():
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = _Route.apply(  # type: ignore[no-untyped-call]
            logits, bias, top_k, sig, route_norm, route_scale)
        return out
    return _route_kernel(logits, bias, top_k, sig, route_norm, route_scale)


#: Token counts up to which the one-rank inference form (routed_decode) is used.
DECODE_MAX_T = 64


def routed_decode(x_TD: torch.Tensor, w_ED: torch.Tensor, bias_E: torch.Tensor | None, w1_EFD: torch.Tensor,
                  w2_EDF: torch.Tensor, w3_EFD: torch.Tensor, tokens_per_expert_E: torch.Tensor, *, top_k: int,
                  score_func: str, route_norm: bool, route_scale: float) -> torch.Tensor:
    """The routed part of a one-rank layer at inference, in six launches and no host
    sync: gate GEMM, route kernel (which also writes a device-side plan: each expert's
    slots), fused up + SwiGLU and down over the touched experts' tiles only (rows found
    through the plan), combine. Each of them is the kernel the general path runs; the
    expert kernels take 16-row tiles here (_decode_tiles_note: a row's bits do not
    depend on the tile, checked on the GPU), so every token gets the bits it gets there.
    Adds each expert's tokens to tokens_per_expert_E."""
    T, D = x_TD.shape
    E = w1_EFD.shape[0]
    K = top_k
    dev = x_TD.device
    x_TD = x_TD.contiguous()
    wg = w_ED.unsqueeze(0)  # as route() passes it: the same strides, the same binary
    logits = _launch(x_TD, wg, wg.stride(), E, None, torch.float32, f32=True)
    count_E = torch.zeros(E, dtype=torch.int32, device=dev)
    slots_ET = torch.empty(E, T, dtype=torch.int32, device=dev)
    bias = bias_E.detach().contiguous() if bias_E is not None else None
    w_TK = _route_kernel(logits, bias, K, score_func == "sigmoid", route_norm, route_scale,
                         plan=(count_E, slots_ET, tokens_per_expert_E))[0]
    h = _up(x_TD, w1_EFD, w3_EFD, count_E, counts=True, save=False, slots=slots_ET, a_div=K, rows_out=T * K,
            decode=True)[0]
    s2 = w2_EDF.stride()
    y_ND = _launch(h, w2_EDF, (s2[0], s2[1], s2[2]), D, count_E, x_TD.dtype, counts=True, slots=slots_ET,
                   rows_out=T * K, decode=True)
    out = torch.empty(T, D, dtype=x_TD.dtype, device=dev)
    block = 1024 if D >= 1024 else max(16, 1 << max(0, D - 1).bit_length())
    _kern("combine_kernel")[(T, (D + block - 1) // block)](
        out, y_ND, w_TK, D, K=K, BLOCK_D=block, ROUND=x_TD.dtype != torch.float32, enable_fp_fusion=False)
    return out


def ordered_sum_last(x: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """Sum over the last dim as a fixed tree of elementwise adds (halves, then the odd
    element): the pairing depends on the dim's length only; log2 launches."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        s = x[..., :h] + x[..., h : 2 * h]
        x = torch.cat([s, x[..., 2 * h :]], dim=-1) if n % 2 else s
    return x if keepdim else x.squeeze(-1)


class InvariantLinearMode(TorchFunctionMode):
    """Inside: F.linear without bias runs the invariant Triton GEMM, and a sum over the
    last dim (the router's top-k normalisation) is an ordered chain of adds. Used by
    spmd_moe.batch_invariant.rowwise on CUDA for per-token functions."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if b is None and wants(x) and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
                return linear(x, w)
        if func in (torch.Tensor.sum, torch.sum):
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            if isinstance(x, torch.Tensor) and wants(x) and x.is_floating_point() and dim in (-1, x.ndim - 1) and 0 < x.shape[-1] <= 64 \
                    and "dtype" not in kwargs:
                return ordered_sum_last(x, keepdim)
        return func(*args, **kwargs)
