"""Triton kernels of spmd_moe.kernels.decode (imported only when Triton is present)."""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl

from spmd_moe.kernels._triton_common import route_scores, route_topk

try:  # programmatic dependent launch (sm90+); used only where a kernel's PDL flag is set
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: the flag is never set there (decode.py checks HAS_PDL)
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass
else:
    HAS_PDL = True


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """PDL: wait for the previous kernel in the stream (its writes visible; and nothing
    of this one touches memory before, so a buffer the previous kernel still used cannot
    be overwritten early), then let the next kernel's programs start as soon as all of
    this one's have: their launch overlaps this kernel's tail. A no-op without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def rn_bf16(v):
    """v rounded to bf16 (nearest even), kept in fp32. By hand because Triton's
    interpreter truncates in .to(tl.bfloat16); on the GPU this equals that cast."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    # NaN stays NaN (the GPU's NaN 0x7FFFFFFF would carry into the sign bit: -0.0).
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def swiglu_bf16(acc1, acc3):
    """As torch: the two GEMM outputs rounded to bf16, silu rounded, the product rounded."""
    a = rn_bf16(acc1)
    b = rn_bf16(acc3)
    return rn_bf16(rn_bf16(a / (1.0 + tl.exp(-a))) * b)


@triton.jit
def expert_rows(u, uniq_ptr, count_ptr, slot_ptr, T, BLOCK_M: tl.constexpr):
    """The u-th touched local expert e (int64) and its rows in the plan: in_m (the first
    count[e] of BLOCK_M) and their slots t*K + k (int64; 0 where not in_m)."""
    e = tl.load(uniq_ptr + u).to(tl.int64)
    n = tl.load(count_ptr + e)
    m_off = tl.arange(0, BLOCK_M)
    in_m = m_off < n
    slots = tl.load(slot_ptr + e * T + m_off, mask=in_m, other=0).to(tl.int64)
    return e, in_m, slots


@triton.jit
def up_acc(
    x_ptr, w1_ptr, w3_ptr, tok, in_m, e, f_off, in_f, D, F, d_lo, d_hi,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 (x rows tok @ w1[e] block f_off .T, the same with w3[e]) over the columns
    [d_lo, d_hi) of D, in BLOCK_D steps upwards (one x tile loaded for both dots)."""
    acc1 = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    w_base = e * F * D
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d_off = d0 + tl.arange(0, BLOCK_D)
        in_d = d_off < d_hi
        xt = tl.load(x_ptr + tok[:, None] * D + d_off[None, :], mask=in_m[:, None] & in_d[None, :], other=0.0)
        wmask = in_f[:, None] & in_d[None, :]
        w1t = tl.load(w1_ptr + w_base + f_off[:, None] * D + d_off[None, :], mask=wmask, other=0.0)
        w3t = tl.load(w3_ptr + w_base + f_off[:, None] * D + d_off[None, :], mask=wmask, other=0.0)
        acc1 = tl.dot(xt, tl.trans(w1t), acc1)
        acc3 = tl.dot(xt, tl.trans(w3t), acc3)
    return acc1, acc3


@triton.jit
def gate_kernel(
    x_ptr, w_ptr, logits_ptr, plan_ptr, D, E, PLAN_N,
    BLOCK_EC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PLAN: tl.constexpr, PDL: tl.constexpr = False,
):
    """fp32 logits of a block of BLOCK_EC experts for one token (the gate GEMV spread
    over T * E/BLOCK_EC programs); the programs also zero the plan counters."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    e_off = tl.program_id(1) * BLOCK_EC + tl.arange(0, BLOCK_EC)
    in_e = e_off < E
    # Each program zeroes its BLOCK_PLAN slice of the plan's counters (the host sizes
    # BLOCK_PLAN so that the programs cover PLAN_N).
    p_off = (t * tl.num_programs(1) + tl.program_id(1)) * BLOCK_PLAN + tl.arange(0, BLOCK_PLAN)
    tl.store(plan_ptr + p_off, tl.zeros([BLOCK_PLAN], dtype=tl.int32), mask=p_off < PLAN_N)
    acc = tl.zeros([BLOCK_EC, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_off = d0 + tl.arange(0, BLOCK_D)
        in_d = d_off < D
        xv = tl.load(x_ptr + t * D + d_off, mask=in_d, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e_off[:, None] * D + d_off[None, :], mask=in_e[:, None] & in_d[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    tl.store(logits_ptr + t * E + e_off, tl.sum(acc, axis=1), mask=in_e)


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, ids_ptr, wts_ptr, count_ptr, nuniq_ptr, uniq_ptr, slot_ptr, tpe_ptr,
    T, E, route_scale, e_start, num_local, row_lo, row_hi, need_ptr, out_ptr, D,
    K: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, FUSED_COMBINE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One token: scores, top-k over all E, weights (route_scores, route_topk; ids and
    weights stored in slot order), and the plan of the local experts [e_start, e_start +
    num_local) in local ids; the token adds to the load-balance counter only if
    row_lo <= t < row_hi. FUSED_COMBINE (the split variant, whose down kernel combines):
    the token's number of local slots goes to need_ptr, and a token without any gets its
    output row zeroed here."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    e_off = tl.arange(0, BLOCK_E)
    in_e = e_off < E
    logits = tl.load(logits_ptr + t * E + e_off, mask=in_e, other=float("-inf"))
    scores = route_scores(logits, in_e, SIGMOID)
    sel, w, k_pos = route_topk(scores, e_off, in_e, bias_ptr, route_scale, K, HAS_BIAS, NORM)
    tl.store(ids_ptr + t * K + k_pos, e_off, mask=sel)
    tl.store(wts_ptr + t * K + k_pos, w, mask=sel)
    t_E = e_off * 0 + t  # (a vector: the interpreter rejects a scalar-broadcast mask here)
    counted = sel & (t_E >= row_lo) & (t_E < row_hi)
    tl.atomic_add(tpe_ptr + e_off, 1.0, mask=counted)  # the layer's load-balance counter (float)
    le = e_off - e_start  # local expert id
    local = sel & (le >= 0) & (le < num_local)
    row = tl.atomic_add(count_ptr + le, 1, mask=local)
    tl.store(slot_ptr + le.to(tl.int64) * T + row, t * K + k_pos, mask=local)
    first = local & (row == 0)
    u = tl.atomic_add(nuniq_ptr + e_off * 0, 1, mask=first)
    tl.store(uniq_ptr + u, le, mask=first)
    if FUSED_COMBINE:
        n_local = tl.sum(local.to(tl.int32), axis=0)
        tl.store(need_ptr + t, n_local)
        none_E = (e_off * 0 + n_local) == 0  # (a vector: the interpreter rejects scalar masks)
        for d0 in range(0, D, BLOCK_E):
            d_off = d0 + e_off
            tl.store(out_ptr + t * D + d_off, tl.zeros([BLOCK_E], dtype=tl.float32).to(out_ptr.dtype.element_ty),
                     mask=none_E & (d_off < D))


@triton.jit
def up_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, count_ptr, nuniq_ptr, uniq_ptr, slot_ptr,
    T, D, F,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    u = tl.program_id(0)
    if u < tl.load(nuniq_ptr):
        e, in_m, slots = expert_rows(u, uniq_ptr, count_ptr, slot_ptr, T, BLOCK_M)
        tok = slots // K
        f_off = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        in_f = f_off < F
        acc1, acc3 = up_acc(x_ptr, w1_ptr, w3_ptr, tok, in_m, e, f_off, in_f, D, F, 0, D, BLOCK_M, BLOCK_F, BLOCK_D)
        h = swiglu_bf16(acc1, acc3)
        tl.store(h_ptr + slots[:, None] * F + f_off[None, :], h.to(h_ptr.dtype.element_ty), mask=in_m[:, None] & in_f[None, :])

@triton.jit
def down_kernel(
    h_ptr, w2_ptr, y_ptr, count_ptr, nuniq_ptr, uniq_ptr, slot_ptr,
    T, D, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    u = tl.program_id(0)
    if u < tl.load(nuniq_ptr):
        e, in_m, slots = expert_rows(u, uniq_ptr, count_ptr, slot_ptr, T, BLOCK_M)
        n_off = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n_off < D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        w_base = e * D * F
        for f0 in range(0, F, BLOCK_F):
            f_off = f0 + tl.arange(0, BLOCK_F)
            in_f = f_off < F
            ht = tl.load(h_ptr + slots[:, None] * F + f_off[None, :], mask=in_m[:, None] & in_f[None, :], other=0.0)
            w2t = tl.load(w2_ptr + w_base + n_off[:, None] * F + f_off[None, :], mask=in_n[:, None] & in_f[None, :], other=0.0)
            acc = tl.dot(ht, tl.trans(w2t), acc)
        y = rn_bf16(acc).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + slots[:, None] * D + n_off[None, :], y, mask=in_m[:, None] & in_n[None, :])

@triton.jit
def combine_kernel(
    out_ptr, y_ptr, wts_ptr, ids_ptr, e_start, num_local, D, N,
    K: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr = False,
):
    """ROUND: spmd_moe.moe's _weighted_sum, each weighted term and each add rounded to
    bf16, ascending k (= ascending expert id). Not ROUND: the same sum in fp32, unrounded
    (a partial sum for a later all-reduce). Slots of non-local experts add exact zeros
    (their y rows were never written, so they are not read). y of slot i is
    rn_bf16(sum over j < NSPLIT of y_ptr[j, i]) (the split variant's fp32 partials; with
    NSPLIT = 1 and bf16 rows the rounding is the identity)."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(wts_ptr + t * K + k)
        le = tl.load(ids_ptr + t * K + k) - e_start + offs * 0  # a vector (interpreter: no scalar masks)
        local = (le >= 0) & (le < num_local)
        y = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(NSPLIT):
            y += tl.load(y_ptr + (j * N + t * K + k) * D + offs, mask=in_d & local, other=0.0).to(tl.float32)
        term = tl.where(local, rn_bf16(y) * w, 0.0)
        if ROUND:
            acc = rn_bf16(acc + rn_bf16(term))  # k = 0: 0 + term = term, already rounded
        else:
            acc = acc + term
    tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=in_d)


# ---- the split variant (small T): weights streamed in more, smaller programs ----


@triton.jit
def up_split_kernel(
    x_ptr, w1_ptr, w3_ptr, p_ptr, h_ptr, ucnt_ptr, count_ptr, nuniq_ptr, uniq_ptr, slot_ptr,
    T, D, F, N, D_CHUNK,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    NSPLIT: tl.constexpr, SWIGLU_HERE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (touched expert, F block, s): x rows @ w1/w3 blocks over the D chunk
    [s * D_CHUNK, (s+1) * D_CHUNK), fp32 partials to p[0 or 1, s, slot, f] (p holds
    2 * NSPLIT * N * F floats). Not SWIGLU_HERE: the down kernel sums them in s order and
    applies SwiGLU. SWIGLU_HERE: the program that completes an (expert, F block) (an
    atomic counter) does that and stores bf16 h rows, as up_kernel."""
    pdl_enter(PDL)
    u = tl.program_id(0)
    if u < tl.load(nuniq_ptr):
        e, in_m, slots = expert_rows(u, uniq_ptr, count_ptr, slot_ptr, T, BLOCK_M)
        tok = slots // K
        f_off = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        in_f = f_off < F
        s = tl.program_id(2)
        d_lo = s * D_CHUNK
        d_hi = tl.minimum(d_lo + D_CHUNK, D)
        acc1, acc3 = up_acc(x_ptr, w1_ptr, w3_ptr, tok, in_m, e, f_off, in_f, D, F, d_lo, d_hi,
                            BLOCK_M, BLOCK_F, BLOCK_D)
        pm = in_m[:, None] & in_f[None, :]
        p1 = p_ptr + (s * N + slots[:, None]) * F + f_off[None, :]
        tl.store(p1, acc1, mask=pm)
        tl.store(p1 + NSPLIT * N * F, acc3, mask=pm)
        if SWIGLU_HERE:
            tl.debug_barrier()  # every thread's partial stored before the counter moves (release)
            old = tl.atomic_add(ucnt_ptr + e * tl.num_programs(1) + tl.program_id(1), 1, sem="acq_rel")
            tl.debug_barrier()
            if old == NSPLIT - 1:
                pa = p_ptr + slots[:, None] * F + f_off[None, :]
                a = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
                b = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
                for j in tl.static_range(NSPLIT):  # chunk order, whichever program is last
                    a += tl.load(pa + j * N * F, mask=pm, other=0.0, cache_modifier=".cg")
                    b += tl.load(pa + (NSPLIT + j) * N * F, mask=pm, other=0.0, cache_modifier=".cg")
                h = swiglu_bf16(a, b)
                tl.store(h_ptr + slots[:, None] * F + f_off[None, :], h.to(h_ptr.dtype.element_ty), mask=pm)


@triton.jit
def down_split_kernel(
    p_ptr, h_ptr, w2_ptr, yp_ptr, out_ptr, wts_ptr, ids_ptr, cnt_ptr, need_ptr,
    count_ptr, nuniq_ptr, uniq_ptr, slot_ptr,
    T, D, F, N, F_CHUNK, NUM_N, e_start, num_local,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    NSPLIT_UP: tl.constexpr, NSPLIT: tl.constexpr, FUSED_COMBINE: tl.constexpr, ROUND: tl.constexpr,
    H_FROM_PARTIALS: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (touched expert, D block, s): h rows of the F chunk s @ w2 block; fp32
    partials to yp[s, slot, d] (NSPLIT * N * D floats). h: the bf16 rows up_split_kernel
    stored (SWIGLU_HERE there), or (H_FROM_PARTIALS) SwiGLU of the up partials, summed in
    their chunk order and each GEMM output rounded to bf16 as torch.

    FUSED_COMBINE: the program that completes a token's D block (the last of its
    need * NSPLIT partials, counted by an atomic per (token, D block)) does that block's
    combine as combine_kernel: the summation order is fixed whichever program is last."""
    pdl_enter(PDL)
    u = tl.program_id(0)
    if u < tl.load(nuniq_ptr):
        e, in_m, slots = expert_rows(u, uniq_ptr, count_ptr, slot_ptr, T, BLOCK_M)
        nb = tl.program_id(1)
        n_off = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n_off < D
        s = tl.program_id(2)
        f_lo = s * F_CHUNK
        f_hi = tl.minimum(f_lo + F_CHUNK, F)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        w_base = e * D * F
        for f0 in range(f_lo, f_hi, BLOCK_F):
            f_off = f0 + tl.arange(0, BLOCK_F)
            in_f = f_off < f_hi
            hm = in_m[:, None] & in_f[None, :]
            if H_FROM_PARTIALS:
                a = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
                b = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
                pa = p_ptr + slots[:, None] * F + f_off[None, :]
                for j in tl.static_range(NSPLIT_UP):  # unrolled: no inner loop in the F loop
                    a += tl.load(pa + j * N * F, mask=hm, other=0.0)
                    b += tl.load(pa + (NSPLIT_UP + j) * N * F, mask=hm, other=0.0)
                h = swiglu_bf16(a, b).to(w2_ptr.dtype.element_ty)
            else:
                h = tl.load(h_ptr + slots[:, None] * F + f_off[None, :], mask=hm, other=0.0)
            w2t = tl.load(w2_ptr + w_base + n_off[:, None] * F + f_off[None, :], mask=in_n[:, None] & in_f[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w2t), acc)
        tl.store(yp_ptr + (s * N + slots[:, None]) * D + n_off[None, :], acc, mask=in_m[:, None] & in_n[None, :])
        if FUSED_COMBINE:
            # Every thread's partial stored before the counter moves (release); the
            # last program reads the others' partials past L1 (.cg) after it (acquire).
            tl.debug_barrier()
            tok = slots // K
            old = tl.atomic_add(cnt_ptr + tok * NUM_N + nb, 1, mask=in_m, sem="acq_rel")
            need = tl.load(need_ptr + tok, mask=in_m, other=0) * NSPLIT
            last = in_m & (old == need - 1)
            tl.debug_barrier()
            out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in tl.static_range(K):
                sl = tok * K + k
                w = tl.load(wts_ptr + sl, mask=last, other=0.0)
                le = tl.load(ids_ptr + sl, mask=last, other=0) - e_start
                loc = last & (le >= 0) & (le < num_local)
                ym = loc[:, None] & in_n[None, :]
                y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(NSPLIT):
                    y += tl.load(yp_ptr + (j * N + sl[:, None]) * D + n_off[None, :], mask=ym, other=0.0,
                                 cache_modifier=".cg")
                term = tl.where(loc[:, None], rn_bf16(y) * w[:, None], 0.0)
                if ROUND:
                    out = rn_bf16(out + rn_bf16(term))
                else:
                    out = out + term
            tl.store(out_ptr + tok[:, None] * D + n_off[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=last[:, None] & in_n[None, :])


# ---- the slot design (T <= SLOT["max_t"]): router in one kernel, up and down per slot ----


@triton.jit
def router_kernel(
    x_ptr, w_ptr, logits_ptr, done_ptr, bias_ptr, ids_ptr, wts_ptr, tpe_ptr,
    D, E, route_scale, row_lo, row_hi,
    K: tl.constexpr, BLOCK_EC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr = False,
):
    """The whole router in one kernel. Program (t, block of BLOCK_EC experts): the gate
    GEMV as gate_kernel (the same arithmetic: the same logits), then a per-token acq_rel
    counter; the token's last program to finish routes it as route_kernel (ids and
    weights in slot order, the load-balance counter for row_lo <= t < row_hi; no plan)
    and sets the counter back to 0 for the next call or graph replay (the counters live
    across calls, zero between them)."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    ec_off = tl.program_id(1) * BLOCK_EC + tl.arange(0, BLOCK_EC)
    in_ec = ec_off < E
    acc = tl.zeros([BLOCK_EC, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_off = d0 + tl.arange(0, BLOCK_D)
        in_d = d_off < D
        xv = tl.load(x_ptr + t * D + d_off, mask=in_d, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + ec_off[:, None] * D + d_off[None, :], mask=in_ec[:, None] & in_d[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    tl.store(logits_ptr + t * E + ec_off, tl.sum(acc, axis=1), mask=in_ec)
    tl.debug_barrier()  # every thread's logits stored before the counter moves (release)
    old = tl.atomic_add(done_ptr + t, 1, sem="acq_rel")
    tl.debug_barrier()
    if old == tl.num_programs(1) - 1:  # the token's last program: the others' logits are visible
        tl.store(done_ptr + t, 0)
        e_off = tl.arange(0, BLOCK_E)
        in_e = e_off < E
        logits = tl.load(logits_ptr + t * E + e_off, mask=in_e, other=float("-inf"), cache_modifier=".cg")
        scores = route_scores(logits, in_e, SIGMOID)
        sel, w, k_pos = route_topk(scores, e_off, in_e, bias_ptr, route_scale, K, HAS_BIAS, NORM)
        tl.store(ids_ptr + t * K + k_pos, e_off, mask=sel)
        tl.store(wts_ptr + t * K + k_pos, w, mask=sel)
        t_E = e_off * 0 + t  # (a vector: the interpreter rejects a scalar-broadcast mask)
        tl.atomic_add(tpe_ptr + e_off, 1.0, mask=sel & (t_E >= row_lo) & (t_E < row_hi))


@triton.jit
def up_slot_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, ids_ptr, D, F, e_start, num_local,
    K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (slot n = t*K + k, F block): h[n] = SwiGLU(x[t] @ w1[e].T, x[t] @ w3[e].T)
    on the block, e = ids[n] - e_start; nothing for a non-local expert. One dependent read
    (the id) before the weights stream, instead of the plan's chain; an expert picked by
    several tokens is read once per token. up_acc's tl.dot on a 16-row tile holding x[t]
    in row 0, and row 0 stored as is: at T=1 the bits of up_kernel with the same tiles.
    (A GEMV in registers instead was 1.7x slower on the H200: Triton does not pipeline
    loads that feed no tl.dot.)"""
    pdl_enter(PDL)
    n = tl.program_id(0)
    le = tl.load(ids_ptr + n) - e_start
    if (le >= 0) & (le < num_local):
        t = n // K
        f_off = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        in_f = f_off < F
        m_off = tl.arange(0, 16)
        a1, a3 = up_acc(x_ptr, w1_ptr, w3_ptr, m_off * 0 + t, m_off == 0, le.to(tl.int64), f_off, in_f, D, F,
                        0, D, 16, BLOCK_F, BLOCK_D)
        h = swiglu_bf16(a1, a3)
        tl.store(h_ptr + n.to(tl.int64) * F + m_off[:, None] * 0 + f_off[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=(m_off == 0)[:, None] & in_f[None, :])


@triton.jit
def down_slot_kernel(
    h_ptr, w2_ptr, y_ptr, ids_ptr, D, F, e_start, num_local,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (slot n, D block): y[n] = h[n] @ w2[e].T on the block, rounded to bf16, by
    tl.dot on a 16-row tile holding h[n] in row 0 (down_kernel's arithmetic: at T=1 its
    bits); nothing for a non-local expert (combine_kernel reads no y row of one). One
    dependent load (the id) before the weights stream."""
    pdl_enter(PDL)
    n = tl.program_id(0)
    le = tl.load(ids_ptr + n) - e_start
    if (le >= 0) & (le < num_local):
        n_off = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n_off < D
        m_off = tl.arange(0, 16)
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        w_base = le.to(tl.int64) * D * F
        for f0 in range(0, F, BLOCK_F):
            f_off = f0 + tl.arange(0, BLOCK_F)
            in_f = f_off < F
            ht = tl.load(h_ptr + n.to(tl.int64) * F + m_off[:, None] * 0 + f_off[None, :],
                         mask=(m_off == 0)[:, None] & in_f[None, :], other=0.0)
            w2t = tl.load(w2_ptr + w_base + n_off[:, None] * F + f_off[None, :], mask=in_n[:, None] & in_f[None, :],
                          other=0.0)
            acc = tl.dot(ht, tl.trans(w2t), acc)
        y = rn_bf16(acc).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + n.to(tl.int64) * D + m_off[:, None] * 0 + n_off[None, :], y,
                 mask=(m_off == 0)[:, None] & in_n[None, :])
