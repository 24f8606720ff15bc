"""The Triton kernels of spmd_moe.kernels.invariant_gemm (this module imports Triton;
invariant_gemm imports it lazily, so the CPU path never needs Triton).

Every GEMM here computes a [BM, BN] output tile with ``_acc``: K walked from 0 upwards
in BK steps into one fp32 accumulator by ``tl.dot``, BM/BN/BK/warps/stages fixed per
dtype (invariant_gemm._config). Which rows sit in a tile, and how they were found (a
contiguous group, a list of slots), changes only the addresses loaded, never a row's
arithmetic. Switches that differ between callers (grouped rows vs. a slot plan; write
a plan or not; save the pre-activations or not) are runtime arguments and are not
specialised on: one binary per tile config serves every form and every T.
"""

from __future__ import annotations

import triton
import triton.language as tl

from spmd_moe.kernels._triton_common import route_scores, route_topk


@triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
def _acc(  # type: ignore[no-untyped-def, unused-ignore]
    a_ptr, a_off, row_ok, w_base, cols, col_ok, K, s_ak, s_wn, s_wk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
):
    """fp32 [BM, BN]: rows at element offsets a_off of a, times w (K from 0 upwards).
    F32: operands read in any dtype and multiplied in fp32 (input_precision 'ieee')."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # fixed order, fixed step: the same for every M
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        a = tl.load(a_ptr + a_off[:, None] + ks[None, :] * s_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + ks[:, None] * s_wk + cols[None, :] * s_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
def _acc2(  # type: ignore[no-untyped-def, unused-ignore]
    a_ptr, a_off, row_ok, w1_base, w3_base, cols, col_ok, K, s_ak, s_wn, s_wk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
):
    """_acc for two weights at once (w1 and w3 of the up projection): each a tile is
    loaded once for both dots; each accumulator gets the very tl.dot sequence _acc does."""
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        a = tl.load(a_ptr + a_off[:, None] + ks[None, :] * s_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = ks[:, None] * s_wk + cols[None, :] * s_wn
        w_ok = k_ok[:, None] & col_ok[None, :]
        b1 = tl.load(w1_base + w_off, mask=w_ok, other=0.0)
        b3 = tl.load(w3_base + w_off, mask=w_ok, other=0.0)
        if F32:
            acc1 = tl.dot(a.to(tl.float32), b1.to(tl.float32), acc1, input_precision="ieee")
            acc3 = tl.dot(a.to(tl.float32), b3.to(tl.float32), acc3, input_precision="ieee")
        else:
            acc1 = tl.dot(a, b1, acc1)
            acc3 = tl.dot(a, b3, acc3)
    return acc1, acc3


@triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
def _tile_of(pid_m, ends_ptr, G, counts_given, GP: tl.constexpr, BM: tl.constexpr):  # type: ignore[no-untyped-def, unused-ignore]
    """Tile map from the group sizes, in the program (no host sync, no extra launch):
    group g owns ceil(rows_g / BM) tiles, in group order. ends_ptr holds cumulative ends
    (counts_given == 0) or per-group counts (!= 0). Returns (tiles in all, group of
    tile pid_m, its first row within the group, the group's start row, its row count)."""
    gs = tl.arange(0, GP)
    in_g = gs < G
    v = tl.load(ends_ptr + gs, mask=in_g, other=0).to(tl.int64)
    given = (gs * 0 + counts_given) != 0  # as a block: a scalar flag in a mask is not portable
    ends = tl.where(given, tl.cumsum(v, 0), v)
    prev_e = tl.load(ends_ptr + gs - 1, mask=in_g & (gs > 0) & ~given, other=0).to(tl.int64)
    prev = tl.where(given, ends - v, prev_e)
    nt = tl.where(in_g, (ends - prev + BM - 1) // BM, 0)
    cum = tl.cumsum(nt, 0)
    total = tl.sum(nt, 0)
    g = tl.sum((cum <= pid_m).to(tl.int32), 0)
    first = tl.sum(tl.where(gs == g, cum - nt, 0), 0)
    start = tl.sum(tl.where(gs == g, prev, 0), 0)
    end = tl.sum(tl.where(gs == g, ends, 0), 0)
    last = tl.sum(tl.where(gs == G - 1, ends, 0), 0)
    return total, g, (pid_m - first) * BM, start, end - start, last


@triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
def _rows(slots_ptr, g, j0, start, count, slot_stride, a_div, use_slots, BM: tl.constexpr):  # type: ignore[no-untyped-def, unused-ignore]
    """Rows j0 .. j0+BM of a group: (valid, row of a, row of the output). Grouped rows
    (use_slots == 0): rows start + j of a and of the output. A slot plan: the group's
    j-th slot s = slots[g, j]; row s // a_div of a, row s of the output."""
    j = j0 + tl.arange(0, BM)
    ok = j < count
    listed = (j * 0 + use_slots) != 0
    s = tl.load(slots_ptr + g.to(tl.int64) * slot_stride + j, mask=ok & listed, other=0).to(tl.int64)
    r = (start + j).to(tl.int64)
    a_row = tl.where(listed, s // a_div, r)
    y_row = tl.where(listed, s, r)
    return ok, a_row, y_row


@triton.jit(do_not_specialize=["R", "counts_given", "use_slots", "a_div", "slot_stride"])  # type: ignore[misc, untyped-decorator, unused-ignore]
def grouped_gemm_kernel(  # type: ignore[no-untyped-def, unused-ignore]
    a_ptr, w_ptr, y_ptr, ends_ptr, slots_ptr,
    R, N, K, G, counts_given, use_slots, a_div, slot_stride,
    s_ar, s_ak, s_wg, s_wn, s_wk, s_yr, s_yn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GP: tl.constexpr,
    F32: tl.constexpr, DENSE: tl.constexpr,
):
    """y[r] = a[r] @ w[g(r)].T. DENSE: one group of all R rows. Grouped: rows of group g
    contiguous (ends) or listed in a slot plan; with grouped rows, rows past the last
    group are zeroed."""
    # One axis, the N tiles of one row tile adjacent: consecutive programs reuse the same
    # rows of a from L2 (one group's weight tile set is small and stays in L2 anyway).
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    col_ok = cols < N
    if DENSE:
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        ok = rows < R
        acc = _acc(a_ptr, rows * s_ar, ok, w_ptr, cols, col_ok, K, s_ak, s_wn, s_wk, BM, BN, BK, F32)
        tl.store(y_ptr + rows[:, None] * s_yr + cols[None, :] * s_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=ok[:, None] & col_ok[None, :])
    else:
        total, g, j0, start, count, last = _tile_of(pid_m, ends_ptr, G, counts_given, GP, BM)
        if pid_m < total:
            ok, a_row, y_row = _rows(slots_ptr, g, j0, start, count, slot_stride, a_div, use_slots, BM)
            acc = _acc(a_ptr, a_row * s_ar, ok, w_ptr + g.to(tl.int64) * s_wg, cols, col_ok, K, s_ak, s_wn, s_wk,
                       BM, BN, BK, F32)
            tl.store(y_ptr + y_row[:, None] * s_yr + cols[None, :] * s_yn,
                     acc.to(y_ptr.dtype.element_ty), mask=ok[:, None] & col_ok[None, :])
        else:
            rows = (last + (pid_m - total) * BM + tl.arange(0, BM)).to(tl.int64)
            zero = tl.zeros((BM, BN), dtype=tl.float32).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * s_yr + cols[None, :] * s_yn, zero,
                     mask=(rows < R)[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["R", "counts_given", "use_slots", "a_div", "slot_stride", "save"])  # type: ignore[misc, untyped-decorator, unused-ignore]
def swiglu_up_kernel(  # type: ignore[no-untyped-def, unused-ignore]
    a_ptr, w1_ptr, w3_ptr, h_ptr, a1_ptr, a3_ptr, ends_ptr, slots_ptr,
    R, N, K, G, counts_given, use_slots, a_div, slot_stride, save,
    s_ar, s_ak, s_wg, s_wn, s_wk, s_yr, s_yn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GP: tl.constexpr, F32: tl.constexpr,
):
    """h = silu(a @ w1[g].T) * (a @ w3[g].T) per group, with torch's rounding steps in
    the output dtype: a1 = rnd(acc1), a3 = rnd(acc3), s = rnd(a1 / (1 + exp(-a1))),
    h = rnd(s * a3) (rnd: to h's dtype; identities in fp32). save != 0: a1 and a3 are
    stored too (the backward's inputs). Rows as grouped_gemm_kernel."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    col_ok = cols < N
    ty = h_ptr.dtype.element_ty
    total, g, j0, start, count, last = _tile_of(pid_m, ends_ptr, G, counts_given, GP, BM)
    if pid_m < total:
        ok, a_row, y_row = _rows(slots_ptr, g, j0, start, count, slot_stride, a_div, use_slots, BM)
        wo = g.to(tl.int64) * s_wg
        acc1, acc3 = _acc2(a_ptr, a_row * s_ar, ok, w1_ptr + wo, w3_ptr + wo, cols, col_ok, K, s_ak, s_wn, s_wk,
                           BM, BN, BK, F32)
        a1 = acc1.to(ty)
        a3 = acc3.to(ty)
        a1f = a1.to(tl.float32)
        s = (a1f / (1.0 + tl.exp(-a1f))).to(ty)
        h = (s.to(tl.float32) * a3.to(tl.float32)).to(ty)
        out = y_row[:, None] * s_yr + cols[None, :] * s_yn
        m = ok[:, None] & col_ok[None, :]
        tl.store(h_ptr + out, h, mask=m)
        if save != 0:
            tl.store(a1_ptr + out, a1, mask=m)
            tl.store(a3_ptr + out, a3, mask=m)
    else:
        rows = (last + (pid_m - total) * BM + tl.arange(0, BM)).to(tl.int64)
        zero = tl.zeros((BM, BN), dtype=tl.float32).to(ty)
        out = rows[:, None] * s_yr + cols[None, :] * s_yn
        m = (rows < R)[:, None] & col_ok[None, :]
        tl.store(h_ptr + out, zero, mask=m)
        if save != 0:
            tl.store(a1_ptr + out, zero, mask=m)
            tl.store(a3_ptr + out, zero, mask=m)


@triton.jit(do_not_specialize=["T", "plan"])  # type: ignore[misc, untyped-decorator, unused-ignore]
def route_kernel(  # type: ignore[no-untyped-def, unused-ignore]
    logits_ptr, bias_ptr, scores_ptr, ids_ptr, wts_ptr, count_ptr, slot_ptr, tpe_ptr,
    T, E, route_scale, plan,
    K: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    """One token (one program): scores (softmax or sigmoid of its fp32 logits), top-k of
    scores + bias (ties: lowest id), gate values from the unbiased scores, renormalised
    and scaled (route_scores, route_topk); the scores, and the K ids in ascending order
    (the combine's order) with their weights, stored. Everything is a function of the
    token's own logits row. plan != 0 (the one-rank decode form): also the plan of the
    grouped kernels (per expert: its count and its slots t*K+k, by atomics; the order of
    slots inside an expert changes no row's arithmetic) and the layer's load-balance
    counter."""
    t = tl.program_id(0).to(tl.int64)
    e_off = tl.arange(0, BLOCK_E)
    in_e = e_off < E
    logits = tl.load(logits_ptr + t * E + e_off, mask=in_e, other=float("-inf"))
    scores = route_scores(logits, in_e, SIGMOID)
    tl.store(scores_ptr + t * E + e_off, scores, mask=in_e)
    sel, w, k_pos = route_topk(scores, e_off, in_e, bias_ptr, route_scale, K, HAS_BIAS, NORM)
    tl.store(ids_ptr + t * K + k_pos, e_off.to(tl.int64), mask=sel)
    tl.store(wts_ptr + t * K + k_pos, w, mask=sel)
    if plan != 0:
        row = tl.atomic_add(count_ptr + e_off, 1, mask=sel)
        tl.atomic_add(tpe_ptr + e_off, 1.0, mask=sel)
        tl.store(slot_ptr + e_off.to(tl.int64) * T + row, t * K + k_pos, mask=sel)


@triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
def combine_kernel(  # type: ignore[no-untyped-def, unused-ignore]
    out_ptr, y_ptr, w_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr,
):
    """out[t] = sum_k w[t, k] * y[t*K + k] in ascending k: each fp32 product rounded to
    y's dtype, each add too (ROUND: bf16/fp16), exactly spmd_moe.moe._weighted_sum and
    spmd_moe._fused_combine (launched with fp fusion off, so no product is fused into
    an add)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < D
    ty = out_ptr.dtype.element_ty
    w0 = tl.load(w_ptr + t * K)
    acc = tl.load(y_ptr + (t * K) * D + offs, mask=in_d, other=0.0).to(tl.float32) * w0
    if ROUND:
        acc = acc.to(ty).to(tl.float32)
    for k in tl.static_range(1, K):
        w = tl.load(w_ptr + t * K + k)
        term = tl.load(y_ptr + (t * K + k) * D + offs, mask=in_d, other=0.0).to(tl.float32) * w
        if ROUND:
            term = term.to(ty).to(tl.float32)
        acc = acc + term
        if ROUND:
            acc = acc.to(ty).to(tl.float32)
    tl.store(out_ptr + t * D + offs, acc.to(ty), mask=in_d)
