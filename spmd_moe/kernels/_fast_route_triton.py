"""Triton kernel of spmd_moe.kernels.fast_route (imported only when Triton is present)."""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl

from spmd_moe.kernels._triton_common import route_scores, route_topk


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, ids_ptr, wts_ptr, T, E, route_scale,
    K: tl.constexpr, BLOCK_E: tl.constexpr, TOKENS: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    """TOKENS tokens per program, one after another: each token's scores from its fp32
    logits, top-k, gate values (route_scores, route_topk), stored at the chosen expert's
    rank in ascending id: ids_TK (int64) and weights_TK (fp32) come out sorted by id."""
    e_off = tl.arange(0, BLOCK_E)
    in_e = e_off < E
    for i in range(TOKENS):
        t = tl.program_id(0).to(tl.int64) * TOKENS + i
        t_E = e_off * 0 + t  # (a vector: the interpreter rejects a scalar-broadcast mask)
        live = in_e & (t_E < T)
        # (a tail program's tokens past T: zeros, routed and not stored)
        logits = tl.where(in_e, tl.load(logits_ptr + t * E + e_off, mask=live, other=0.0), float("-inf"))
        scores = route_scores(logits, in_e, SIGMOID)
        sel, w, k_pos = route_topk(scores, e_off, in_e, bias_ptr, route_scale, K, HAS_BIAS, NORM)
        tl.store(ids_ptr + t * K + k_pos, e_off.to(tl.int64), mask=sel & live)
        tl.store(wts_ptr + t * K + k_pos, w, mask=sel & live)


@triton.jit
def route_tile(
    logits, t_off, in_t, e_off, in_e, bias_ptr, ids_ptr, wts_ptr, E, route_scale,
    K: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    """Route a [BLOCK_T, BLOCK_E] tile of fp32 logits (tokens t_off; rows not in_t are
    routed and not stored) with K rounds of a row max (the highest choice not yet taken,
    lowest id among equals) in place of a sort of each token's E lanes: route_topk's
    experts (ties to the lowest id; NaN ranks as -inf, so K distinct experts always) and
    formulas for the gate values (sums in another order: fp32 ulps). Stores ids (int64)
    and weights (fp32) at the chosen expert's rank in ascending id."""
    in_e2 = (t_off[:, None] * 0 + e_off[None, :]) < E  # [BLOCK_T, BLOCK_E]
    e2 = (t_off[:, None] * 0 + e_off[None, :]).to(tl.int32)
    if SIGMOID:
        scores = tl.where(in_e2, tl.sigmoid(logits), 0.0)
    else:
        logits = tl.where(in_e2, logits, float("-inf"))
        mx = tl.max(logits, axis=1)
        p = tl.where(in_e2, tl.exp(logits - mx[:, None]), 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e_off, mask=in_e, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(in_e2 & (choice == choice), choice, float("-inf"))
    taken = e2 * 0  # 1 where chosen
    for _ in tl.static_range(K):
        cand = tl.where(taken != 0, float("-inf"), choice)
        best = tl.max(cand, axis=1)
        hit = (cand == best[:, None]) & in_e2 & (taken == 0)
        pick = tl.min(tl.where(hit, e2, BLOCK_E), axis=1)
        taken = tl.where(e2 == pick[:, None], 1, taken)
    sel = taken != 0
    w = tl.where(sel, scores, 0.0)
    if NORM:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * route_scale
    k_pos = tl.cumsum(sel.to(tl.int32), axis=1) - 1
    out = t_off[:, None] * K + k_pos
    keep = sel & in_t[:, None]
    tl.store(ids_ptr + out, e2.to(tl.int64), mask=keep)
    tl.store(wts_ptr + out, w, mask=keep)


@triton.jit
def route_rows_kernel(
    logits_ptr, bias_ptr, ids_ptr, wts_ptr, T, E, route_scale,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    """route_kernel's result for a [BLOCK_T, E] tile of tokens at once (route_tile)."""
    t_off = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_off = tl.arange(0, BLOCK_E)
    in_t = t_off < T
    in_e = e_off < E
    # (tokens past T: zeros, routed and not stored)
    logits = tl.load(logits_ptr + t_off[:, None] * E + e_off[None, :], mask=in_t[:, None] & in_e[None, :], other=0.0)
    route_tile(logits, t_off, in_t, e_off, in_e, bias_ptr, ids_ptr, wts_ptr, E, route_scale,
               K, BLOCK_E, SIGMOID, HAS_BIAS, NORM)


@triton.jit
def gate_route_kernel(
    x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, T, E, D, route_scale,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr,
):
    """The gate GEMM and the route in one kernel: a tile of BLOCK_T tokens' fp32 logits
    (x @ w.T, fp32 accumulation over D in BLOCK_D steps; IEEE: fp32 inputs, the
    interpreter's stand-in) kept in registers and routed (route_tile): no logits in memory."""
    t_off = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_off = tl.arange(0, BLOCK_E)
    in_t = t_off < T
    in_e = e_off < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_off = d0 + tl.arange(0, BLOCK_D)
        in_d = d_off < D
        xt = tl.load(x_ptr + t_off[:, None] * D + d_off[None, :], mask=in_t[:, None] & in_d[None, :], other=0.0)
        wt = tl.load(w_ptr + e_off[:, None] * D + d_off[None, :], mask=in_e[:, None] & in_d[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    route_tile(acc, t_off, in_t, e_off, in_e, bias_ptr, ids_ptr, wts_ptr, E, route_scale,
               K, BLOCK_E, SIGMOID, HAS_BIAS, NORM)
