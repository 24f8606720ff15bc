"""The Triton kernels of spmd_moe.kernels.invariant_gemm (this module imports Triton;
invariant_gemm imports it lazily, so the CPU path never needs Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
def _tile(  # type: ignore[no-untyped-def, unused-ignore]
    a_ptr, w_base, y_ptr, row0, end, pid_n, N, K, s_ar, s_ak, s_wn, s_wk, s_yr, s_yn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """One [BM, BN] output tile: rows [row0, end) of one group, K from 0 upwards."""
    rows = (row0 + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    row_ok = rows < end
    col_ok = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # fixed order, fixed step: the same for every M
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * s_ar + ks[None, :] * s_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + ks[:, None] * s_wk + cols[None, :] * s_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(y_ptr + rows[:, None] * s_yr + cols[None, :] * s_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

@triton.jit(do_not_specialize=["R"])  # type: ignore[misc, untyped-decorator, unused-ignore]
def grouped_gemm_kernel(  # type: ignore[no-untyped-def, unused-ignore]
    a_ptr, w_ptr, y_ptr, ends_ptr,
    R, N, K, G,
    s_ar, s_ak, s_wg, s_wn, s_wk, s_yr, s_yn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GP: tl.constexpr,
    IEEE: tl.constexpr, DENSE: tl.constexpr,
):
    # One axis, the N tiles of one row tile adjacent: consecutive programs reuse the same
    # rows of a from L2 (one group's weight tile set is small and stays in L2 anyway).
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if DENSE:  # one group, all R rows: tile m holds rows [m*BM, m*BM + BM)
        _tile(a_ptr, w_ptr, y_ptr, pid_m * BM, R, pid_n, N, K, s_ar, s_ak, s_wn, s_wk, s_yr, s_yn,
              BM, BN, BK, IEEE)
    else:
        # Tile map from the group ends, in the program (no host sync, no extra
        # launches): group g owns ceil(rows_g / BM) tiles, in group order; the tiles
        # after them zero the rows of no group; programs past those exit.
        gs = tl.arange(0, GP)
        in_g = gs < G
        ends = tl.load(ends_ptr + gs, mask=in_g, other=0)
        prev = tl.load(ends_ptr + gs - 1, mask=in_g & (gs > 0), other=0)
        nt = tl.where(in_g, (ends - prev + BM - 1) // BM, 0)
        cum = tl.cumsum(nt, 0)
        total = tl.sum(nt, 0)
        if pid_m < total:
            g = tl.sum((cum <= pid_m).to(tl.int32), 0)
            first = tl.sum(tl.where(gs == g, cum - nt, 0), 0)
            start = tl.sum(tl.where(gs == g, prev, 0), 0)
            end = tl.sum(tl.where(gs == g, ends, 0), 0)
            _tile(a_ptr, w_ptr + g.to(tl.int64) * s_wg, y_ptr, start + (pid_m - first) * BM, end, pid_n,
                  N, K, s_ar, s_ak, s_wn, s_wk, s_yr, s_yn, BM, BN, BK, IEEE)
        else:
            last = tl.sum(tl.where(gs == G - 1, ends, 0), 0)
            rows = (last + (pid_m - total) * BM + tl.arange(0, BM)).to(tl.int64)
            cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
            zero = tl.zeros((BM, BN), dtype=tl.float32).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * s_yr + cols[None, :] * s_yn, zero,
                     mask=(rows < R)[:, None] & (cols < N)[None, :])
