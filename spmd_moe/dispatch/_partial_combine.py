"""Per-token fp32 partial sums on the expert rank (the all-to-all dispatcher's return trip
under MoEConfig.kernels='fast', inference): for each received token t,

    part[t] = sum_k w[t, k] * row(slot t*K + k)      in fp32, ascending k, unrounded

over the slots served by this rank's experts (the others add nothing). One row per
(token, expert rank) travels back instead of one row per (token, k) on that rank: with
K = 8 and n = 2 about 4 bf16 rows become one fp32 row (2x fewer bytes), and the receiver
needs no permutation of its expert outputs (the kernel reads them through the slot ->
row map). The sender adds the ranks' partial sums in rank order and rounds once.

CUDA: one Triton kernel each way (grid: tokens x D blocks): ``partial_sums`` on the expert
rank, ``sum_over_ranks`` on the sender (0 + part_0 + part_1 + ... in rank order, ranks the
token was not sent to skipped, then one rounding: the same fp32 adds as the torch form,
bitwise). Elsewhere (CPU tests) the same sums with torch ops; Triton's interpreter runs
the kernels for the tests that opt in (TRITON_INTERPRET=1 SPMD_MOE_DECODE_INTERPRET=1,
fp32 tensors).

The fixed-size exchange (all_to_all.py, no host read) adds kernels that read a device
count instead of a host size, so no work is done for the rows of its worst-case buffers
past the count: ``fixed_plan`` (the send plan: a running scan per destination),
``gather_rows`` (expand to expert-major rows; scaled, the slot rows' gradient),
``partial_sums_mapped`` (the partial sums given the slot -> row map), ``slot_weight_grads``
(the gate values' gradient), ``swiglu_bounded`` (the fused SwiGLU's arithmetic up to the
row count, forward and backward) and ``sum_over_ranks_at`` (the sender's sum from the
positions alone). Each but swiglu_bounded has a torch form for the CPU with the same
values (fixed_plan's is fixed_exchange.fixed_plan); where the fused kernels do not
run, GroupedExperts itself replaces swiglu_bounded.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

_kernel: Any = None
_sum_kernel: Any = None
_gather_kernel: Any = None
_wgrad_kernel: Any = None
_swiglu_fwd_kernel: Any = None
_swiglu_bwd_kernel: Any = None
_plan_kernel: Any = None
_plan_count_kernel: Any = None
swiglu_math: Any = None  # spmd_moe.kernels._fused_bwd_triton.swiglu_math once _build ran
swiglu_bwd_math: Any = None  # spmd_moe.kernels._fused_bwd_triton.swiglu_bwd_math once _build ran
_tried = False
slot_row: Any = None  # spmd_moe.kernels._triton_common.slot_row once _build ran
plan_hits: Any = None  # spmd_moe.kernels._triton_common.plan_hits once _build ran


def _build() -> Any:
    global _kernel, _sum_kernel, _gather_kernel, _wgrad_kernel, _swiglu_fwd_kernel, _swiglu_bwd_kernel, _plan_kernel, _plan_count_kernel, _tried
    global slot_row, swiglu_math, swiglu_bwd_math, plan_hits
    if _tried:
        return _kernel
    _tried = True
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    from spmd_moe.kernels._triton_common import plan_hits, slot_row  # globals (the interpreter sees no closure)
    from spmd_moe.kernels._fused_bwd_triton import swiglu_bwd_math, swiglu_math

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def partial_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        out_ptr, rows_ptr, row_of_slot_ptr, w_ptr, D,
        K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(0, K):
            x, w, has_row = slot_row(rows_ptr, row_of_slot_ptr, w_ptr, t, k, K, D, offs, in_d)
            acc += tl.where(has_row, x * w, 0.0)  # other ranks' experts' slots (no row): nothing added
        tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=in_d)  # fp32 out: no-op

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def sum_ranks_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        out_ptr, parts_ptr, pos_ptr, D,
        N_RANKS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(0, N_RANKS):
            p = tl.load(pos_ptr + t * N_RANKS + j)
            sent = offs * 0 + p >= 0
            x = tl.load(parts_ptr + p * D + offs, mask=in_d & sent, other=0.0)
            acc = tl.where(sent, acc + x, acc)  # a rank the token did not go to adds nothing
        tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=in_d)

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def gather_rows_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        out_ptr, src_ptr, idx_ptr, count_ptr, scale_ptr, D,
        DIV: tl.constexpr, SCALED: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs < D
        # A grid-stride loop up to the device count: no program is launched for the rows
        # past it (a fixed grid over the worst case would start as many empty ones).
        count = tl.load(count_ptr).to(tl.int32)
        for m32 in range(tl.program_id(0), count, tl.num_programs(0)):
            m = tl.zeros([BLOCK_D], dtype=tl.int64) + m32  # int64 addresses (the interpreter's m32 is an int)
            i = tl.load(idx_ptr + m)
            x = tl.load(src_ptr + (i // DIV) * D + offs, mask=in_d)
            if SCALED:  # out = src * scale[idx] in fp32, one rounding
                x = (x.to(tl.float32) * tl.load(scale_ptr + i)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + m * D + offs, x, mask=in_d)

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def wgrad_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        out_ptr, g_ptr, rows_ptr, row_of_slot_ptr, D,
        K: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, KP)
        r_K = tl.load(row_of_slot_ptr + t * K + ks, mask=ks < K, other=-1).to(tl.int64)
        acc = tl.zeros([KP, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            in_d = offs < D
            g = tl.load(g_ptr + t * D + offs, mask=in_d, other=0.0).to(tl.float32)
            m2 = (r_K[:, None] >= 0) & in_d[None, :]
            x = tl.load(rows_ptr + r_K[:, None] * D + offs[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += tl.where(m2, x * g[None, :], 0.0)  # slots without a row here: 0 (g may be anything)
        tl.store(out_ptr + t * K + ks, tl.sum(acc, axis=1), mask=ks < K)

    _kernel = partial_kernel
    _sum_kernel = sum_ranks_kernel
    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def swiglu_fwd_bounded_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        h_ptr, a1_ptr, a3_ptr, rows_ptr, F, BLOCK: tl.constexpr, ROUND: tl.constexpr,
    ):
        # swiglu_math: swiglu_fwd_kernel's arithmetic, shared (the same bits),
        # over the first rows_ptr[0] rows only (a device count).
        n = tl.load(rows_ptr).to(tl.int64) * F
        # A grid-stride loop up to the live elements: no program for the rows past the count.
        for b in range(tl.program_id(0), tl.cdiv(n, BLOCK).to(tl.int32), tl.num_programs(0)):
            offs = (tl.zeros([BLOCK], dtype=tl.int64) + b) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            a1 = tl.load(a1_ptr + offs, mask=m, other=0.0).to(tl.float32)
            a3 = tl.load(a3_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(h_ptr + offs, swiglu_math(a1, a3, ROUND).to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def swiglu_bwd_bounded_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        ga1_ptr, ga3_ptr, g_ptr, a1_ptr, a3_ptr, rows_ptr, F, BLOCK: tl.constexpr, ROUND: tl.constexpr,
    ):
        # swiglu_bwd_kernel's arithmetic (the same bits), first rows_ptr[0] rows only.
        n = tl.load(rows_ptr).to(tl.int64) * F
        for b in range(tl.program_id(0), tl.cdiv(n, BLOCK).to(tl.int32), tl.num_programs(0)):
            offs = (tl.zeros([BLOCK], dtype=tl.int64) + b) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            a1 = tl.load(a1_ptr + offs, mask=m, other=0.0).to(tl.float32)
            a3 = tl.load(a3_ptr + offs, mask=m, other=0.0).to(tl.float32)
            ga1, ga3 = swiglu_bwd_math(g, a1, a3, ROUND)
            tl.store(ga1_ptr + offs, ga1.to(ga1_ptr.dtype.element_ty), mask=m)
            tl.store(ga3_ptr + offs, ga3.to(ga3_ptr.dtype.element_ty), mask=m)

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def plan_count_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        cnt_ptr, ids_ptr, T, E_LOCAL, NB, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Program (j, b): how many of block b's tokens go to rank j.
        j, b = tl.program_id(0), tl.program_id(1)
        t = b * BLOCK + tl.arange(0, BLOCK)
        hit = plan_hits(ids_ptr, t, t < T, j, E_LOCAL, K, KP)
        tl.store(cnt_ptr + j * NB + b, tl.sum(hit.to(tl.int64), axis=0))

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def plan_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        tok_ptr, pos_ptr, ids_ptr, before_ptr, T, E_LOCAL, NB,
        K: tl.constexpr, KP: tl.constexpr, N_RANKS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Program (j, b): block b's tokens for rank j, in token order after the blocks
        # before it (before[j, b]: their count; before[j, NB]: rank j's total), packed at
        # the start of segment j; rows b*BLOCK.. of segment j past the total get token T
        # (none); pos[t, j] = the row of token t, or -1.
        j, b = tl.program_id(0), tl.program_id(1)
        t = b * BLOCK + tl.arange(0, BLOCK)
        in_t = t < T
        hit = plan_hits(ids_ptr, t, in_t, j, E_LOCAL, K, KP)
        row = j * T + tl.load(before_ptr + j * (NB + 1) + b) + tl.cumsum(hit.to(tl.int64), axis=0) - 1
        tl.store(pos_ptr + t.to(tl.int64) * N_RANKS + j, tl.where(hit, row, -1), mask=in_t)
        tl.store(tok_ptr + row, t.to(tl.int64), mask=hit)
        total = tl.load(before_ptr + j * (NB + 1) + NB)
        tl.store(tok_ptr + j * T + t, tl.full([BLOCK], 0, tl.int64) + T, mask=in_t & (t >= total))

    _plan_count_kernel = plan_count_kernel
    _gather_kernel = gather_rows_kernel
    _wgrad_kernel = wgrad_kernel
    _plan_kernel = plan_kernel
    _swiglu_fwd_kernel = swiglu_fwd_bounded_kernel
    _swiglu_bwd_kernel = swiglu_bwd_bounded_kernel
    return _kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SPMD_MOE_DECODE_INTERPRET") == "1"


def use_kernel(rows_RD: torch.Tensor) -> bool:
    """CUDA with Triton (bf16/fp16/fp32 rows), or the interpreter in tests that opt in."""
    if rows_RD.device.type != "cuda" and not _interpreting():
        return False
    return _build() is not None


def partial_sums(rows_RD: torch.Tensor, slots_R: torch.Tensor, weights_rK: torch.Tensor) -> torch.Tensor:
    """[r, D] float32: row i of rows_RD belongs to slot slots_R[i] (index into r*K);
    weights_rK float32, the K gate values of each token (ascending expert id)."""
    r, K = weights_rK.shape
    R, D = rows_RD.shape
    dev = rows_RD.device
    w_rK = weights_rK.float().contiguous()
    if use_kernel(rows_RD):
        row_of_slot = torch.full((r * K,), -1, dtype=torch.int64, device=dev)
        row_of_slot.scatter_(0, slots_R, torch.arange(R, dtype=torch.int64, device=dev))
        out_rD = torch.empty(r, D, dtype=torch.float32, device=dev)
        if r > 0 and D > 0:
            block = 1024 if D >= 1024 else max(16, 1 << (D - 1).bit_length())
            _build()[(r, (D + block - 1) // block)](out_rD, rows_RD.contiguous(), row_of_slot, w_rK, D, K=K, BLOCK_D=block)
        return out_rD
    slots_rKD = rows_RD.new_zeros(r * K, D).index_copy_(0, slots_R, rows_RD).view(r, K, D)
    acc_rD = torch.zeros(r, D, dtype=torch.float32, device=dev)
    for k in range(K):  # ascending k, fp32, as the kernel
        acc_rD += slots_rKD[:, k].float() * w_rK[:, k : k + 1]
    return acc_rD


def sum_over_ranks(
    parts_SD: torch.Tensor, pos_Tn: torch.Tensor, tok_idx_S: torch.Tensor, send_tok: list[int], out_dtype: torch.dtype
) -> torch.Tensor:
    """[T, D] in out_dtype: for each token the fp32 sum, in rank order, of the partial
    sums that came back for it (parts_SD: destination-major, token order, as sent), rounded
    once. pos_Tn[t, j]: the row of parts_SD holding token t's sum from rank j, or -1;
    tok_idx_S / send_tok: the same map as sent (the torch form uses these)."""
    T, n = pos_Tn.shape
    D = parts_SD.shape[-1]
    dev = parts_SD.device
    if use_kernel(parts_SD):
        out_TD = torch.empty(T, D, dtype=out_dtype, device=dev)
        if T > 0 and D > 0:
            block = 1024 if D >= 1024 else max(16, 1 << (D - 1).bit_length())
            _sum_kernel[(T, (D + block - 1) // block)](out_TD, parts_SD.contiguous(), pos_Tn.contiguous(), D, N_RANKS=n, BLOCK_D=block)
        return out_TD
    # Rank order, one destination at a time (no index repeats within one add).
    y_TD = torch.zeros(T, D, dtype=torch.float32, device=dev)
    off = 0
    for cnt in send_tok:
        if cnt:
            y_TD.index_add_(0, tok_idx_S[off : off + cnt], parts_SD[off : off + cnt].float())
        off += cnt
    return y_TD.to(out_dtype)


# ------------------------------------------------------------ the fixed-size exchange
_GATHER_PROGRAMS = 4096  # rows in flight of the count-bounded gather (each program loops over its rows)


def _block(D: int) -> int:
    return 1024 if D >= 1024 else max(16, 1 << (D - 1).bit_length())


def gather_rows(
    src_ND: torch.Tensor, idx_M: torch.Tensor, div: int, count_1: torch.Tensor,
    scale_X: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[M, D]: row m is src_ND[idx_M[m] // div] (times scale_X[idx_M[m]] in fp32, rounded
    once to out_dtype, when given) for m < count_1[0] (a device count: no host read); the
    rows past it are left undefined on CUDA (no work done for them) and are the same
    gather elsewhere."""
    M, D = idx_M.shape[0], src_ND.shape[-1]
    dt = out_dtype or src_ND.dtype
    if use_kernel(src_ND):
        out_MD = torch.empty(M, D, dtype=dt, device=src_ND.device)
        if M > 0 and D > 0:
            block = _block(D)
            _build()
            scale = scale_X.float().contiguous() if scale_X is not None else count_1
            _gather_kernel[(min(M, _GATHER_PROGRAMS), (D + block - 1) // block)](
                out_MD, src_ND.contiguous(), idx_M.contiguous(), count_1, scale, D,
                DIV=div, SCALED=scale_X is not None, BLOCK_D=block)
        return out_MD
    rows_MD = src_ND[idx_M // div]
    if scale_X is None:
        return rows_MD.to(dt)
    return (rows_MD.float() * scale_X.float()[idx_M].unsqueeze(-1)).to(dt)


def slot_weight_grads(g_ND: torch.Tensor, rows_MD: torch.Tensor, row_of_slot_X: torch.Tensor, K: int) -> torch.Tensor:
    """[N, K] float32: <g_ND[t], rows_MD[row_of_slot[t*K + k]]> in fp32 (0 for a slot
    without a row here): the gate values' gradient of ``partial_sums_mapped``."""
    N, D = g_ND.shape
    if use_kernel(g_ND):
        out_NK = torch.empty(N, K, dtype=torch.float32, device=g_ND.device)
        if N > 0:
            kp = 1 << max(0, (K - 1).bit_length())
            _build()
            _wgrad_kernel[(N,)](out_NK, g_ND.contiguous(), rows_MD.contiguous(), row_of_slot_X.contiguous(), D,
                                K=K, KP=kp, BLOCK_D=max(16, min(1 << max(0, (D - 1).bit_length()), 2048 // kp)))
        return out_NK
    r_NK = row_of_slot_X.view(N, K)
    out_NK = torch.zeros(N, K, dtype=torch.float32, device=g_ND.device)
    if rows_MD.shape[0] == 0:
        return out_NK
    for k in range(K):
        x_ND = rows_MD[r_NK[:, k].clamp(min=0)].float()
        out_NK[:, k] = torch.where(r_NK[:, k] >= 0, (x_ND * g_ND.float()).sum(-1), 0.0)
    return out_NK


def partial_sums_mapped(
    rows_MD: torch.Tensor, row_of_slot_X: torch.Tensor, weights_NK: torch.Tensor, out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, D] (float32 unless out_dtype: rounded once): part[t] = sum_k w[t, k] * rows_MD[row_of_slot[t*K + k]] over the
    slots with a row (>= 0), ascending k, in fp32 (``partial_sums`` given the slot ->
    row map itself: rows_MD may have undefined rows that no slot maps to); written into
    ``out`` (contiguous [N, D] of out_dtype) when given."""
    N, K = weights_NK.shape
    D = rows_MD.shape[-1]
    dev = rows_MD.device
    w_NK = weights_NK.float().contiguous()
    if use_kernel(rows_MD):
        out_ND = torch.empty(N, D, dtype=out_dtype, device=dev) if out is None else out
        if N > 0 and D > 0:
            block = _block(D)
            _build()[(N, (D + block - 1) // block)](out_ND, rows_MD.contiguous(), row_of_slot_X.contiguous(), w_NK, D, K=K, BLOCK_D=block)
        return out_ND
    r_NK = row_of_slot_X.view(N, K)
    acc_ND = torch.zeros(N, D, dtype=torch.float32, device=dev)
    for k in range(K):  # ascending k, fp32, as the kernel; slots without a row add nothing
        has = r_NK[:, k : k + 1] >= 0
        x_ND = rows_MD[r_NK[:, k].clamp(min=0)].float() if rows_MD.shape[0] else acc_ND
        acc_ND += torch.where(has, x_ND * w_NK[:, k : k + 1], 0.0)
    return acc_ND.to(out_dtype) if out is None else out.copy_(acc_ND)


def sum_over_ranks_at(
    parts_ND: torch.Tensor, pos_Tn: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_over_ranks`` with the positions only (no host-side split sizes): [T, D] in
    out_dtype, 0 + the sums at pos_Tn[t, 0], pos_Tn[t, 1], ... (-1: none) in fp32, one
    rounding; written into ``out`` (contiguous [T, D]) when given."""
    T, n = pos_Tn.shape
    D = parts_ND.shape[-1]
    if use_kernel(parts_ND):
        out_TD = torch.empty(T, D, dtype=out_dtype, device=parts_ND.device) if out is None else out
        if T > 0 and D > 0:
            block = _block(D)
            _build()
            _sum_kernel[(T, (D + block - 1) // block)](out_TD, parts_ND.contiguous(), pos_Tn.contiguous(), D, N_RANKS=n, BLOCK_D=block)
        return out_TD
    acc_TD = torch.zeros(T, D, dtype=torch.float32, device=parts_ND.device)
    for j in range(n):  # rank order, as the kernel
        p_T1 = pos_Tn[:, j : j + 1]
        x_TD = parts_ND[p_T1.reshape(-1).clamp(min=0)].float() if parts_ND.shape[0] else acc_TD
        acc_TD = torch.where(p_T1 >= 0, acc_TD + x_TD, acc_TD)
    return acc_TD.to(out_dtype) if out is None else out.copy_(acc_TD)


_SWIGLU_BLOCK = 1024
_SWIGLU_PROGRAMS = 8192  # blocks in flight (each program loops over its blocks up to the live rows)


class _BoundedSwiGLU(torch.autograd.Function):
    """silu(a1) * a3 over the first rows_1[0] rows (a device count), the fused SwiGLU's
    arithmetic (spmd_moe.kernels.fused_bwd.swiglu: the same bits on those rows); the rows
    past the count are left undefined, forward and backward (nothing reads them: the
    grouped GEMMs stop at the last offset)."""

    @staticmethod
    def forward(ctx: Any, a1_RF: torch.Tensor, a3_RF: torch.Tensor, rows_1: torch.Tensor, round_bf16: bool) -> torch.Tensor:
        a1_RF, a3_RF = a1_RF.contiguous(), a3_RF.contiguous()
        h_RF = torch.empty_like(a1_RF)
        n, F = a1_RF.numel(), a1_RF.shape[-1]
        if n:
            _build()
            _swiglu_fwd_kernel[(min((n + _SWIGLU_BLOCK - 1) // _SWIGLU_BLOCK, _SWIGLU_PROGRAMS),)](h_RF, a1_RF, a3_RF, rows_1, F, BLOCK=_SWIGLU_BLOCK, ROUND=round_bf16)
        ctx.save_for_backward(a1_RF, a3_RF, rows_1)
        ctx.round_bf16 = round_bf16
        return h_RF

    @staticmethod
    def backward(ctx: Any, g_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        a1_RF, a3_RF, rows_1 = ctx.saved_tensors
        g_RF = g_RF.contiguous()
        ga1_RF, ga3_RF = torch.empty_like(a1_RF), torch.empty_like(a3_RF)
        n, F = a1_RF.numel(), a1_RF.shape[-1]
        if n:
            _swiglu_bwd_kernel[(min((n + _SWIGLU_BLOCK - 1) // _SWIGLU_BLOCK, _SWIGLU_PROGRAMS),)](
                ga1_RF, ga3_RF, g_RF, a1_RF, a3_RF, rows_1, F, BLOCK=_SWIGLU_BLOCK, ROUND=ctx.round_bf16)
        return ga1_RF, ga3_RF, None, None


def swiglu_bounded(a1_RF: torch.Tensor, a3_RF: torch.Tensor, rows_1: torch.Tensor, round_bf16: bool) -> torch.Tensor:
    """See _BoundedSwiGLU (Triton: CUDA, or the interpreter in tests)."""
    out: torch.Tensor = _BoundedSwiGLU.apply(a1_RF, a3_RF, rows_1, round_bf16)  # type: ignore[no-untyped-call]
    return out


def fixed_plan(ids_TK: torch.Tensor, num_local: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fixed-size exchange's send plan in one kernel (fixed_exchange.fixed_plan's
    torch form, the same values): each buffer row's token [n*T] (T: none) and each token's
    row per rank [T, n] (-1: not sent there). None where the kernel does not run."""
    if not use_kernel(ids_TK) or ids_TK.shape[0] == 0:
        return None
    T, K = ids_TK.shape
    dev = ids_TK.device
    tok_N = torch.empty(n * T, dtype=torch.int64, device=dev)
    pos_Tn = torch.empty(T, n, dtype=torch.int64, device=dev)
    ids_TK = ids_TK.contiguous()
    kp = 1 << max(0, (K - 1).bit_length())
    nb = (T + _PLAN_BLOCK - 1) // _PLAN_BLOCK
    _build()
    # Block-parallel (a serial scan over T was 0.25 ms at T=16384): counts per (rank,
    # block), their exclusive scan per rank (the last column: the rank's total), the rows.
    cnt_nb = torch.empty(n, nb, dtype=torch.int64, device=dev)
    _plan_count_kernel[(n, nb)](cnt_nb, ids_TK, T, num_local, nb, K=K, KP=kp, BLOCK=_PLAN_BLOCK)
    before_nb1 = F.pad(torch.cumsum(cnt_nb, dim=1), (1, 0))
    _plan_kernel[(n, nb)](tok_N, pos_Tn, ids_TK, before_nb1, T, num_local, nb, K=K, KP=kp, N_RANKS=n, BLOCK=_PLAN_BLOCK)
    return tok_N, pos_Tn


_PLAN_BLOCK = 256


def slot_plan(
    ids_NK: torch.Tensor, w_NK: torch.Tensor, start: int, e: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The expert rank's plan for slots n*K + k with global expert ids ids_NK (any dtype;
    local: start..start+e-1) in one stable counting sort (two kernels and a scan): gate
    values [N, K] fp32, rows per local expert [e], slot -> row [N*K] (-1: none here), the
    slot order [M] (M = N*min(K, e) rounded up to 8; the first R expert-major, the rest
    slot 0) and R [1]: fixed_exchange._fixed_slots' torch form's values up to R. None
    where the kernels do not run."""
    if not use_kernel(w_NK) or e <= 0:
        return None
    from spmd_moe.kernels import _lazy

    ks = _lazy.load("_slot_plan_triton")
    if ks is None:
        return None
    N, K = ids_NK.shape
    dev = ids_NK.device
    ids_NK = ids_NK if ids_NK.stride(-1) == 1 else ids_NK.contiguous()
    w_NK = w_NK if w_NK.stride(-1) == 1 else w_NK.contiguous()
    X, M = N * K, N * min(K, e)
    M += -M % 8  # the CUDA weight-gradient GEMM needs 16-byte rows (see _fixed_slots)
    e_p2 = max(16, 1 << max(0, (e - 1).bit_length()))
    block = max(16, min(1024, 8192 // e_p2))
    nb = max(1, (X + block - 1) // block)
    order_M = torch.empty(M, dtype=torch.int64, device=dev)
    row_of_slot_X = torch.empty(X, dtype=torch.int64, device=dev)
    w_out_NK = torch.empty(N, K, dtype=torch.float32, device=dev)
    counts_e = torch.empty(e, dtype=torch.int64, device=dev)
    rows_R = torch.empty(1, dtype=torch.int64, device=dev)
    cnt_eb = torch.empty(e, nb, dtype=torch.int64, device=dev)
    ks.slot_count_kernel[(nb,)](cnt_eb, ids_NK, ids_NK.stride(0), X, start, e, nb, K=K, BLOCK=block, E_P2=e_p2)
    incl_eb = torch.cumsum(cnt_eb, dim=1)  # along the contiguous dim (a scan down dim 0 is slow on CUDA)
    ks.slot_order_kernel[(nb,)](order_M, row_of_slot_X, w_out_NK, counts_e, rows_R, cnt_eb, incl_eb,
                                ids_NK, ids_NK.stride(0), w_NK, w_NK.stride(0), X, M, start, e, nb,
                                K=K, BLOCK=block, E_P2=e_p2)
    return w_out_NK, counts_e, row_of_slot_X, order_M, rows_R
