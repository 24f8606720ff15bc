"""The expert rank's slot plan for the fixed-size exchange (spmd_moe.dispatch._partial_combine.
slot_plan): a stable counting sort of the N*K slots by local expert, in two kernels around
one scan, where the torch form takes about twenty launches (a sort, binary searches, a
scatter...): the host issues a layer's forward faster than the GPU runs it only with
few launches."""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl


@triton.jit
def _keys(ids_ptr, ids_stride, x, in_x, start, e, K: tl.constexpr):
    """Slot x = n*K + k: its local expert (id - start), or e where it has none here."""
    loc = tl.load(ids_ptr + (x // K).to(tl.int64) * ids_stride + x % K, mask=in_x, other=-1).to(tl.int64) - start
    return tl.where(in_x & (loc >= 0) & (loc < e), loc, e)


@triton.jit
def slot_count_kernel(cnt_ptr, ids_ptr, ids_stride, X, start, e, NB, K: tl.constexpr, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    # Program b: how many of slots b*BLOCK.. each local expert has (cnt[expert, b]).
    b = tl.program_id(0)
    x = b * BLOCK + tl.arange(0, BLOCK)
    key = _keys(ids_ptr, ids_stride, x, x < X, start, e, K)
    lanes = tl.arange(0, E_P2)
    cnt = tl.sum((key[:, None] == lanes[None, :]).to(tl.int64), axis=0)
    tl.store(cnt_ptr + lanes.to(tl.int64) * NB + b, cnt, mask=lanes < e)


@triton.jit
def slot_order_kernel(
    order_ptr, row_of_slot_ptr, w_out_ptr, counts_ptr, rows_ptr, cnt_ptr, incl_ptr,
    ids_ptr, ids_stride, w_ptr, w_stride, X, M, start, e, NB,
    K: tl.constexpr, BLOCK: tl.constexpr, E_P2: tl.constexpr,
):
    # Program b: the row of each of its slots, in expert order, then slot order (the
    # experts' offsets from the scanned counts' last column, the blocks before this one
    # from its column); order[row] = slot, row_of_slot[slot] = row (-1: no expert here);
    # its slots' gate values in fp32; rows M's tail past the total: slot 0 (never read).
    b = tl.program_id(0)
    x = b * BLOCK + tl.arange(0, BLOCK)
    in_x = x < X
    key = _keys(ids_ptr, ids_stride, x, in_x, start, e, K)
    lanes = tl.arange(0, E_P2)
    in_e = lanes < e
    total = tl.load(incl_ptr + lanes.to(tl.int64) * NB + NB - 1, mask=in_e, other=0)
    off = tl.cumsum(total, axis=0) - total
    before = tl.load(incl_ptr + lanes.to(tl.int64) * NB + b, mask=in_e, other=0) - tl.load(
        cnt_ptr + lanes.to(tl.int64) * NB + b, mask=in_e, other=0)
    hot = (key[:, None] == lanes[None, :]).to(tl.int32)
    rank = tl.cumsum(hot, axis=0) - hot  # earlier slots of the same expert in this block
    row = tl.sum(hot.to(tl.int64) * (off + before)[None, :], axis=1) + tl.sum(hot * rank, axis=1).to(tl.int64)
    mine = key < e
    tl.store(order_ptr + row, x.to(tl.int64), mask=mine)
    tl.store(row_of_slot_ptr + x, tl.where(mine, row, -1), mask=in_x)
    w = tl.load(w_ptr + (x // K).to(tl.int64) * w_stride + x % K, mask=in_x, other=0.0)
    tl.store(w_out_ptr + x, w.to(tl.float32), mask=in_x)
    R = tl.sum(total, axis=0)
    tail = R + x
    tl.store(order_ptr + tail, tl.zeros([BLOCK], tl.int64), mask=tail < M)
    if b == 0:
        tl.store(counts_ptr + lanes, total, mask=in_e)
        tl.store(rows_ptr, R)
