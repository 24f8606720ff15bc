"""Triton kernel of spmd_moe.kernels.gather_gemm (imported only when Triton is present).

Loads are cast to fp32 only where the interpreter needs it (it cannot load bf16: the tests
feed fp32 tensors holding bf16 values with ROUND=True); on the GPU the tiles stay bf16 and
tl.dot runs on the tensor cores with fp32 accumulation.
"""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl

from spmd_moe.kernels._decode_triton import rn_bf16
from spmd_moe.kernels._fused_bwd_triton import swiglu_math


@triton.jit
def expert_tile(pid_m, counts_ptr, E, BM: tl.constexpr, E_P2: tl.constexpr):
    """The expert of row tile pid_m, when each expert's rows (counts[e], expert-sorted) are
    cut into ceil(count / BM) tiles in expert order: (e as int64, the tile's first row,
    the expert's row end (0 past the last tile), whether pid_m is a tile at all). A vector scan of the E counts,
    on the device: no host read, so the grid is sized for the worst case."""
    lanes = tl.arange(0, E_P2)
    counts = tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.int32)
    tiles = (counts + BM - 1) // BM
    tile_end = tl.cumsum(tiles, axis=0)
    row_end = tl.cumsum(counts, axis=0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    here = lanes == e
    first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), axis=0)
    end = tl.sum(tl.where(here, row_end, 0), axis=0)
    start = end - tl.sum(tl.where(here, counts, 0), axis=0)
    is_tile = e < E
    # Past the last tile: an empty row range (end 0), so every row mask is false.
    return e.to(tl.int64), start + (pid_m - first_tile) * BM, tl.where(is_tile, end, 0), is_tile


@triton.jit
def row_tile(counts_ptr, F, E, BM: tl.constexpr, BN: tl.constexpr, E_P2: tl.constexpr):
    """This program's tile: (expert e as int64, its BM rows, which of them are the expert's,
    the n tile, whether it is a tile at all). The n tiles of one row tile are consecutive
    programs: they run side by side and the row tile's x rows stay in L2."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(F, BN)
    e, row0, row_end, is_tile = expert_tile(pid // n_tiles, counts_ptr, E, BM, E_P2)
    rows = row0 + tl.arange(0, BM)
    return e, rows, rows < row_end, pid % n_tiles, is_tile


@triton.jit
def swiglu_store(h_ptr, acc1, acc3, rows, in_m, cols, F, ROUND: tl.constexpr):
    """h = SwiGLU of the two fp32 accumulators, rounded first to bf16 (ROUND) as the grouped
    GEMMs' bf16 outputs are, with the unfused SwiGLU kernel's arithmetic (swiglu_math)."""
    if ROUND:
        acc1 = rn_bf16(acc1)
        acc3 = rn_bf16(acc3)
    h = swiglu_math(acc1, acc3, ROUND)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=in_m[:, None] & (cols < F)[None, :])


@triton.jit
def gather_swiglu_kernel(
    h_ptr, x_ptr, slots_ptr, counts_ptr, w1_ptr, w3_ptr, D, F, E, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr,
    EVEN_K: tl.constexpr, ROUND: tl.constexpr,
):
    """h[r, n] = silu(x[tok r] @ w1[e].T)[n] * (x[tok r] @ w3[e].T)[n] for the rows r of this
    program's row tile (all of expert e) and its BN columns; tok r = slots[r] // K.

    The A rows are read from x through the slot map (no gathered copy of x); both GEMMs
    share each A tile. Programs past the last tile (the grid is the worst case, sized
    without the counts) skip the loads and the epilogue. The weight tiles by pointers:
    gather_swiglu_tma_kernel reads them by TMA."""
    e, rows, in_m, pid_n, is_tile = row_tile(counts_ptr, F, E, BM, BN, E_P2)
    if is_tile:
        tok = tl.load(slots_ptr + rows, mask=in_m, other=0).to(tl.int64) // K
        ks = tl.arange(0, BK)
        cols = pid_n * BN + tl.arange(0, BN)
        in_n = cols < F
        a_ptrs = x_ptr + tok[:, None] * D + ks[None, :]
        w_rows = e * F + cols.to(tl.int64)
        b1_ptrs = w1_ptr + w_rows[None, :] * D + ks[:, None]
        b3_ptrs = w3_ptr + w_rows[None, :] * D + ks[:, None]
        acc1 = tl.zeros([BM, BN], dtype=tl.float32)
        acc3 = tl.zeros([BM, BN], dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, BK)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=in_m[:, None], other=0.0)
                b1 = tl.load(b1_ptrs, mask=in_n[None, :], other=0.0)
                b3 = tl.load(b3_ptrs, mask=in_n[None, :], other=0.0)
            else:
                in_k = ks < D - kb * BK
                a = tl.load(a_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
                b1 = tl.load(b1_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
                b3 = tl.load(b3_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
            acc1 = tl.dot(a, b1, acc1)
            acc3 = tl.dot(a, b3, acc3)
            a_ptrs += BK
            b1_ptrs += BK
            b3_ptrs += BK
        swiglu_store(h_ptr, acc1, acc3, rows, in_m, cols, F, ROUND)


@triton.jit
def gather_swiglu_tma_kernel(
    h_ptr, x_ptr, slots_ptr, counts_ptr, w1_desc, w3_desc, D, F, E, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr,
    EVEN_K: tl.constexpr, ROUND: tl.constexpr,
):
    """gather_swiglu_kernel with the weight tiles read by TMA (w1 and w3 as [E * F, D]
    descriptors, [BN, BK] blocks; the hardware zero-fills past D): the same tiles and
    order of the sums, fewer registers and instructions for the B loads."""
    e, rows, in_m, pid_n, is_tile = row_tile(counts_ptr, F, E, BM, BN, E_P2)
    if is_tile:
        tok = tl.load(slots_ptr + rows, mask=in_m, other=0).to(tl.int64) // K
        ks = tl.arange(0, BK)
        a_ptrs = x_ptr + tok[:, None] * D + ks[None, :]
        # Rows of another expert (past F in the last n tile) only feed columns never stored.
        w_row = (e * F).to(tl.int32) + pid_n * BN
        acc1 = tl.zeros([BM, BN], dtype=tl.float32)
        acc3 = tl.zeros([BM, BN], dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, BK)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=in_m[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=in_m[:, None] & (ks < D - kb * BK)[None, :], other=0.0)
            b1 = w1_desc.load([w_row, kb * BK])
            b3 = w3_desc.load([w_row, kb * BK])
            acc1 = tl.dot(a, b1.T, acc1)
            acc3 = tl.dot(a, b3.T, acc3)
            a_ptrs += BK
        swiglu_store(h_ptr, acc1, acc3, rows, in_m, pid_n * BN + tl.arange(0, BN), F, ROUND)
