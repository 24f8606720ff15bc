"""Triton kernels of spmd_moe.kernels.fused_bwd (imported only when Triton is present).

ROUND (constexpr): bf16 arithmetic, i.e. round to bf16 (nearest even, kept in fp32) where
torch's eager bf16 ops round; False: plain fp32, as torch's fp32 ops. Loads are cast to
fp32 and stores to the output's dtype, so the same kernels serve bf16 tensors on the GPU
and, in Triton's interpreter (which cannot load bf16), fp32 tensors holding bf16 values.
"""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import os

import triton
import triton.language as tl

from spmd_moe.kernels._decode_triton import rn_bf16

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no libdevice: numpy's exp

    @triton.jit
    def exp_f32(x):
        return tl.exp(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp_f32(x):
        # libdevice's expf, which torch's CUDA silu calls; tl.exp is ex2.approx on fp32.
        return libdevice.exp(x)


@triton.jit
def swiglu_math(a1, a3, ROUND: tl.constexpr):
    """silu(a1) * a3 in fp32 as torch's eager ops: silu as x / (1 + exp(-x)) (IEEE division),
    rounded to bf16 (ROUND), then the product rounded. Inlined into each kernel that calls it
    (here and in spmd_moe.dispatch._partial_combine): one source, the same arithmetic."""
    s = tl.div_rn(a1, 1.0 + exp_f32(-a1))
    if ROUND:
        s = rn_bf16(s)
    h = s * a3
    if ROUND:
        h = rn_bf16(h)
    return h


@triton.jit
def swiglu_bwd_math(g, a1, a3, ROUND: tl.constexpr):
    """(grad_a1, grad_a3) of h = silu(a1) * a3 from g, rounded where torch's autograd rounds
    (see swiglu_bwd_kernel)."""
    e = exp_f32(-a1)
    s = tl.div_rn(a1, 1.0 + e)  # the forward's silu, recomputed
    sig = tl.div_rn(1.0, 1.0 + e)
    gs = g * a3
    if ROUND:
        s = rn_bf16(s)
        gs = rn_bf16(gs)
    ga3 = g * s
    ga1 = gs * sig * (1.0 + a1 * (1.0 - sig))
    if ROUND:
        ga3 = rn_bf16(ga3)
        ga1 = rn_bf16(ga1)
    return ga1, ga3


@triton.jit
def swiglu_fwd_kernel(h_ptr, a1_ptr, a3_ptr, N, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    """h = silu(a1) * a3 as torch's eager F.silu(a1) * a3: silu in fp32 (x / (1 + exp(-x)),
    IEEE division), rounded to bf16, then the product rounded to bf16."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a1 = tl.load(a1_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a3 = tl.load(a3_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, swiglu_math(a1, a3, ROUND).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def swiglu_bwd_kernel(ga1_ptr, ga3_ptr, g_ptr, a1_ptr, a3_ptr, N, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    """Both input grads of h = silu(a1) * a3 from g = dL/dh, rounded where torch's autograd
    rounds: ga3 = g * silu(a1) (the bf16 silu), gs = g * a3 rounded, then torch's
    silu_backward formula gs * sig * (1 + a1 * (1 - sig)) in fp32, rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a1 = tl.load(a1_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a3 = tl.load(a3_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ga1, ga3 = swiglu_bwd_math(g, a1, a3, ROUND)
    tl.store(ga1_ptr + offs, ga1.to(ga1_ptr.dtype.element_ty), mask=m)
    tl.store(ga3_ptr + offs, ga3.to(ga3_ptr.dtype.element_ty), mask=m)


@triton.jit
def combine_fwd_kernel(out_ptr, rows_ptr, row_of_slot_ptr, w_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr,
                       ROUND: tl.constexpr):
    """out[t] = sum_k w[t, k] * rows[row_of_slot[t*K + k]] in ascending k (row -1: unsent,
    a zero row), as spmd_moe.moe's _weighted_sum: each product in fp32, rounded to the
    rows' dtype, then each add rounded (launched without FMA contraction, so the fp32
    form adds rounded products too)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(row_of_slot_ptr + t * K + k).to(tl.int64)
        w = tl.load(w_ptr + t * K + k)
        x = tl.load(rows_ptr + r * D + offs, mask=in_d & (offs * 0 + r >= 0), other=0.0).to(tl.float32)
        term = x * w
        if ROUND:
            term = rn_bf16(term)
        if k == 0:
            acc = term
        else:
            acc = acc + term
            if ROUND:
                acc = rn_bf16(acc)
    tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def combine_bwd_kernel(grad_rows_ptr, grad_w_ptr, prod_ptr, g_ptr, rows_ptr, row_of_slot_ptr, w_ptr, D,
                       K: tl.constexpr, K_P2: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr,
                       PROD: tl.constexpr):
    """One program per token t, both grads of the combine from g = dL/dout[t]:
    grad_rows[row of (t, k)] = g * w[t, k] (fp32 product, rounded to bf16 as autograd's cast
    of the fp32 gradient) and grad_w[t, k] = dot(g, row of (t, k)) in fp32 (0 for unsent).
    PROD: instead of the dot, store the fp32 products g * row to prod[t, k, :] (the caller
    sums them with torch, in autograd's reduction order)."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_P2)
    in_k = ks < K
    r_K = tl.load(row_of_slot_ptr + t * K + ks, mask=in_k, other=-1).to(tl.int64)
    w_K = tl.load(w_ptr + t * K + ks, mask=in_k, other=0.0)
    sent_K = r_K >= 0
    acc_KD = tl.zeros([K_P2, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        in_d = offs < D
        g = tl.load(g_ptr + t * D + offs, mask=in_d, other=0.0).to(tl.float32)
        m_KD = sent_K[:, None] & in_d[None, :]
        ptr_KD = r_K[:, None] * D + offs[None, :]
        y_KD = tl.load(rows_ptr + ptr_KD, mask=m_KD, other=0.0).to(tl.float32)
        if PROD:  # unsent slots: g * 0, as autograd's product with the zero slot
            tl.store(prod_ptr + (t * K + ks)[:, None] * D + offs[None, :], g[None, :] * y_KD,
                     mask=in_k[:, None] & in_d[None, :])
        else:
            acc_KD += g[None, :] * y_KD
        gr_KD = g[None, :] * w_K[:, None]
        if ROUND:
            gr_KD = rn_bf16(gr_KD)
        tl.store(grad_rows_ptr + ptr_KD, gr_KD.to(grad_rows_ptr.dtype.element_ty), mask=m_KD)
    if not PROD:
        tl.store(grad_w_ptr + t * K + ks, tl.sum(acc_KD, axis=1), mask=in_k)
