"""Batch-invariant mode: a token's MoE output does not depend on the rest of the batch.

Why a mode is needed. A GEMM kernel picks its blocking (and so the order in which it
adds the products of one dot product) from the matrix shapes; on CPU (torch 2.13,
MKL/oneDNN) ``x[:M] @ W`` gives a different first row for some M than for others, and
cuBLAS picks split-K and tile shapes from M. Elementwise transcendental ops on CPU
(sigmoid, SiLU) are vectorized over the flattened tensor with a scalar tail that
computes them differently (measured: 3.5-4 % of fp32 inputs differ in the last bit), so
where a token's elements fall also matters. In an MoE the rows an expert sees are whatever
tokens chose it, so without a fix a token's output depends on its batch neighbours,
on the EP degree and on the dispatcher.

What the mode does: every op that reduces over a token's features, or whose result
depends on where the token's elements sit, runs in a form whose per-token result
cannot depend on the other rows.

CPU (any device but CUDA): fixed-shape blocks at a content-addressed slot.
Routed rows are laid out in blocks of ``BLOCK_ROWS`` (16) rows per expert, tokens in
blocks of ``TOKEN_BLOCK_ROWS`` (64) for per-token functions (router, shared experts); a
row always sits at slot ``hash(row's bits) mod B`` of a block, and a block holds at
most one row per slot (rows whose slot is taken go to the next block of the same
expert; empty slots are zeros). Per-token functions run once per block on a [B, D] view
with the same shape, strides, 64-byte alignment and thread count every time. The
experts run as one autograd Function: per block the GEMMs (forward and input gradient)
and the sigmoid, each one such call; the exact elementwise ops (IEEE mul, add, sub are
correctly rounded in the vector and the scalar paths alike) once over the whole buffer. So every op a row meets (GEMM, SiLU/sigmoid with its vector/scalar split,
softmax, top-k, their backward) is the same call with the row at the same position,
whatever else is in the batch. What this rests on: a kernel run twice on the same
shapes, strides, alignment and thread count computes each output element with the
same sequence of floating-point operations on that element's inputs (no data-dependent
control flow, no cross-row dependence). It does NOT rest on a BLAS kernel choice such
as "row position inside a tile does not matter" or "M does not change the blocking"
(both vary between BLAS builds and between Intel and AMD code paths). Bitwise claims
hold on one machine, library build and thread count; not across machines.

CUDA: Triton kernels (spmd_moe.kernels.invariant_gemm) with fixed tiles, no split-K
and a fixed-order K loop: a row's accumulation never involves other rows. The router is
the fp32 gate GEMM plus one route program per token (scores, top-k, renorm); the
experts are a fused up + SwiGLU kernel (torch's rounding steps) and the down GEMM; the
shared experts use the GEMM with torch's elementwise ops around it (each element or row
computed the same way whatever the tensor's size: torch's kernel structure, checked by
the GPU tests). One rank at inference with T <= DECODE_MAX_T takes a decode form
(routed_decode: six launches, a device-side plan over the touched
experts, no host sync) built from the same kernels and binaries, so a token's bits do
not depend on which form ran.

Everything else was exact already: moving rows (gather, index_copy, all_to_all,
all_gather), adding the exact zeros of the all-gather dispatcher, the combine's fp32
products and its sum in ascending expert id (tests/test_batch_invariance.py checks
them through the layer). The shared experts' Partial sums are added in rank order
(all_gather + an ordered sum) with more than 2 ranks.

So a token's output (and its input gradient) is a function of that token, the
weights and the EP degree only. Cost: see docs/parity.md (CPU: one small GEMM per
block of 16 rows and expert; CUDA: the Triton kernels instead of cuBLAS/CUTLASS).

Turn it on with ``with spmd_moe.batch_invariant():``, ``set_batch_invariant(True)``
or the environment variable ``SPMD_MOE_BATCH_INVARIANT=1`` (read at import; handy for
spawned workers such as vLLM's).
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import spmd_types as spmd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float, Int

from spmd_moe import _debug
from spmd_moe.placement import EP, Par, Placed, Rep, Var, unchecked_cast

_enabled: bool = os.environ.get("SPMD_MOE_BATCH_INVARIANT", "0") not in ("", "0", "false", "False")


def is_batch_invariant() -> bool:
    return _enabled


def set_batch_invariant(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def batch_invariant(on: bool = True) -> Iterator[None]:
    """Run the MoE layers inside the block in batch-invariant mode."""
    global _enabled
    old = _enabled
    _enabled = bool(on)
    try:
        yield
    finally:
        _enabled = old


_X = TypeVar("_X", bound=torch.Tensor)
_Y = TypeVar("_Y")

#: Rows per block on CPU for the grouped experts (per expert) and for per-token
#: functions (router, shared experts). Every block call has this many rows; multiples
#: of 16 keep every block view 64-byte aligned for 4-byte dtypes (2-byte: even D).
#: Token blocks are bigger: the router and shared experts see every token, and a
#: block's cost there is mostly per-call overhead, not its row count.
BLOCK_ROWS = 16
TOKEN_BLOCK_ROWS = 64
_ALIGN = 64
_mults: dict[tuple[int, str], torch.Tensor] = {}


def _multipliers(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    m = _mults.get(key)
    if m is None:
        g = torch.Generator().manual_seed(0x5EED)
        m = torch.randint(1, 1 << 20, (n,), generator=g, dtype=torch.int64).to(device)
        _mults[key] = m
    return m


def row_bucket(x_RD: torch.Tensor, nbuckets: int = BLOCK_ROWS) -> torch.Tensor:
    """[R] int64 slot of each row in [0, nbuckets) (a power of 2): a hash of the row's
    bits in integer arithmetic (exact in any order; int64 wrap-around is exact modulo
    2**64). Equal rows get equal slots; the slot depends on nothing but the row."""
    x = x_RD.detach().contiguous()
    if x.shape[0] == 0 or x.numel() == 0:
        return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    es = x.element_size()
    word = {2: torch.int16, 4: torch.int32, 8: torch.int32}.get(es, torch.uint8)
    bits = x.view(word).reshape(x.shape[0], -1).to(torch.int64)
    h = (bits * _multipliers(bits.shape[1], x.device)).sum(dim=-1)
    # Multiply-shift: the top bits mix every bit of h (low mantissa bits may all be 0).
    return torch.bitwise_right_shift(h * -7046029254386353131, 40) & (nbuckets - 1)


def token_slots(bucket_T: torch.Tensor, B: int) -> tuple[torch.Tensor, int]:
    """block_slots for one group: (flat position of each row, number of blocks)."""
    T = bucket_T.shape[0]
    if T == 0:
        return bucket_T, 0
    slot_T1 = bucket_T.unsqueeze(1)
    run_TB = torch.zeros(T, B, dtype=torch.int64, device=bucket_T.device).scatter_(1, slot_T1, 1).cumsum(0)
    occ_T = run_TB.gather(1, slot_T1).squeeze(1) - 1
    return occ_T * B + bucket_T, int(run_TB[-1].max())


def block_slots(ends_g: torch.Tensor, bucket_R: torch.Tensor, B: int = BLOCK_ROWS) -> tuple[torch.Tensor, list[int]]:
    """Place rows into blocks of B rows. Rows come grouped (group g: rows up to
    ends_g[g], cumulative); row i of group g goes to slot bucket_R[i] of one of group
    g's blocks (the n-th row of g with that slot in g's n-th block). Returns the flat
    position of each row in the block buffer (groups' blocks in group order) and the
    number of blocks per group (one host sync)."""
    R = bucket_R.shape[0]
    G = ends_g.shape[0]
    dev = bucket_R.device
    if R == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), [0] * G
    # Running count of each slot over the rows, with a zero row in front.
    slot_R1 = bucket_R.unsqueeze(1)
    run_RB = torch.zeros(R + 1, B, dtype=torch.int64, device=dev)
    run_RB[1:].scatter_(1, slot_R1, 1)
    run_RB = run_RB.cumsum(0)
    ends_g = ends_g.to(torch.int64)
    start_gB = run_RB[torch.cat([ends_g.new_zeros(1), ends_g[:-1]])]
    nblk_g = (run_RB[ends_g] - start_gB).amax(dim=1)
    group_R = torch.bucketize(torch.arange(R, device=dev), ends_g, right=True)
    occ_R = (run_RB[1:].gather(1, slot_R1) - start_gB[group_R].gather(1, slot_R1)).squeeze(1) - 1
    first_blk_g = torch.cumsum(nblk_g, 0) - nblk_g
    pos_R = (first_blk_g[group_R] + occ_R) * B + bucket_R
    return pos_R, [int(v) for v in nblk_g.tolist()]


def _blocks(x_RD: torch.Tensor, pos_R: torch.Tensor, nblk: int, B: int) -> tuple[torch.Tensor, ...]:
    """The rows scattered to their slots of nblk zero blocks, as nblk [B, D] views (the
    scatter and the unbind are exact and differentiable: index_copy / stack backward)."""
    D = x_RD.shape[1]
    buf = x_RD.new_zeros(nblk * B, D).index_copy(0, pos_R, x_RD)
    blocks: tuple[torch.Tensor, ...] = buf.view(nblk, B, D).unbind(0)
    if (B * D * x_RD.element_size()) % _ALIGN:
        # Not every block view would start 64-byte aligned: fresh allocations do.
        blocks = tuple(b.clone() for b in blocks)
    return blocks


def _aligned(w: torch.Tensor) -> torch.Tensor:
    """w itself when contiguous and 64-byte aligned (one expert's slice of the stacked
    weights usually is); else a fresh copy, so the kernel sees the same alignment
    whatever the expert's index (EP degree) is."""
    if w.is_contiguous() and w.data_ptr() % _ALIGN == 0:
        return w
    return w.contiguous().clone()


def _cat_rows(outs: list[Any]) -> Any:
    if isinstance(outs[0], tuple):
        return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))
    return torch.cat(outs)


def _take(out: Any, pos_R: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return tuple(o.index_select(0, pos_R) for o in out)
    return out.index_select(0, pos_R)


def _use_triton(x: torch.Tensor) -> bool:
    if x.device.type != "cuda":
        if x.device.type != "cpu" or "spmd_moe.kernels.invariant_gemm" not in sys.modules:
            return False
    from spmd_moe.kernels import invariant_gemm

    return invariant_gemm.wants(x) and invariant_gemm.available()


def rowwise(fn: Callable[[_X], _Y], x_TD: _X) -> _Y:
    """fn applied per token, batch-invariantly: fn's result for a row depends on that
    row only (fn returns a tensor or a tuple of tensors with one row per input row).

    CPU: fn runs on fixed [BLOCK_ROWS, D] blocks, each row at its content-addressed
    slot (see the module docstring). CUDA: fn runs once on all rows with F.linear
    replaced by the invariant Triton GEMM (elementwise ops are per element on CUDA).
    Rows keep x_TD's placement and fn's placement passes through."""
    if _use_triton(x_TD):
        from spmd_moe.kernels import invariant_gemm

        with invariant_gemm.InvariantLinearMode():
            return fn(x_TD)
    B = TOKEN_BLOCK_ROWS
    pos_T, nblk = _token_layout(x_TD, B)
    if nblk == 0:
        # No rows: one zero block that is still attached to x_TD's graph, keep 0 rows.
        probe: Any = fn(cast(_X, torch.cat([x_TD, x_TD.new_zeros(B, x_TD.shape[1])])))
        if isinstance(probe, tuple):
            return cast(_Y, tuple(p[:0] for p in probe))
        return cast(_Y, probe[:0])
    outs: list[Any] = [fn(cast(_X, blk)) for blk in _blocks(x_TD, pos_T, nblk, B)]
    return cast(_Y, _take(_cat_rows(outs), pos_T))


def route(
    x_TD: Float[Placed[Var[EP]], "T D"], w_ED: Float[Placed[Rep[EP]], "E D"], bias_E: Any, cfg: Any,
) -> tuple[Float[Placed[Var[EP]], "T K"], Int[Placed[Var[EP]], "T K"], Float[Placed[Var[EP]], "T E"]] | None:
    """The router on the Triton path (CUDA): (weights_TK, expert_ids_TK, scores_TE) from
    the invariant gate GEMM and one route program per token (see
    spmd_moe.kernels.invariant_gemm.route); None where that path does not apply (CPU,
    group-limited routing): the caller runs rowwise."""
    if cfg.num_expert_groups is not None or not _use_triton(x_TD):
        return None
    from spmd_moe.kernels import invariant_gemm

    w, ids, scores = invariant_gemm.route(x_TD, w_ED, bias_E, top_k=cfg.top_k, score_func=cfg.score_func,
                                          route_norm=cfg.route_norm, route_scale=cfg.route_scale)
    why = "per-token route of this rank's rows"
    return (unchecked_cast(Placed[Var[EP]], w, reason=why), unchecked_cast(Placed[Var[EP]], ids, reason=why),
            unchecked_cast(Placed[Var[EP]], scores, reason=why))


def routed_decode(moe: Any, x_TD: Float[Placed[Var[EP]], "T D"]) -> Float[Placed[Var[EP]], "T D"] | None:
    """The routed part of a one-rank layer (router, experts, combine) in the invariant
    kernels' decode form (spmd_moe.kernels.invariant_gemm.routed_decode), or None where
    it does not apply: it needs the Triton path, one rank, no autograd, T <=
    DECODE_MAX_T, plain top-k routing (not forced, not recorded, no group limit), the
    experts in the input's dtype, debug mode off. Its bits are the general path's.
    (Attributes are fetched once: nn.Module lookups are a visible part of a decode
    step's host time.)"""
    if moe.pctx.size != 1 or _debug._enabled or not _use_triton(x_TD):
        return None
    from spmd_moe.kernels import invariant_gemm

    T = x_TD.shape[0]
    if not 0 < T <= invariant_gemm.DECODE_MAX_T or x_TD.dtype not in (torch.bfloat16, torch.float32):
        return None
    cfg = moe.cfg
    if moe.forced_routes_TK is not None or moe.record_routes or cfg.num_expert_groups is not None:
        return None
    ex = moe.routed_experts.inner_experts
    w1, gate, tpe = ex.w1_EFD, moe.router.gate.weight, moe.tokens_per_expert_E
    if (cfg.expert_dtype or x_TD.dtype) != x_TD.dtype or w1.dtype != x_TD.dtype:
        return None
    if tpe.dtype != torch.float32:  # the route kernel counts into it (fp32 atomics)
        return None
    if torch.is_grad_enabled() and (x_TD.requires_grad or w1.requires_grad or gate.requires_grad):
        return None
    if spmd.is_type_checking():
        return None
    y = invariant_gemm.routed_decode(
        x_TD, gate, moe.expert_bias_E, w1, ex.w2_EDF, ex.w3_EFD, tpe,
        top_k=cfg.top_k, score_func=cfg.score_func, route_norm=cfg.route_norm, route_scale=cfg.route_scale)
    return unchecked_cast(Placed[Var[EP]], y, reason="one rank: router, experts and combine of its own tokens")


# The router and the shared experts of one layer call see the same token tensor: its
# layout is computed once. The entry holds a weak reference (no activation or autograd
# graph is kept alive) and is used only for that very tensor object, unchanged since
# (version counter).
_layout_cache: list[Any] = [None, -1, 0, None, 0]


def _untracked() -> contextlib.AbstractContextManager[Any]:
    return spmd.no_typecheck() if spmd.is_type_checking() else contextlib.nullcontext()


def _like_rows(pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Debug mode's tracked region: the block layout is bookkeeping computed untracked
    (seeded constants, scatter counts); its positions belong to the rows they place, so
    they take the rows' placement. A no-op outside a tracked region."""
    if spmd.is_type_checking():
        spmd.assert_local_type_like(pos, rows)
    return pos


def _token_layout(x_TD: torch.Tensor, B: int) -> tuple[torch.Tensor, int]:
    if x_TD.is_inference():  # no version counter to validate a cached entry with
        with _untracked():
            pos, n = token_slots(row_bucket(x_TD, B), B)
        return _like_rows(pos, x_TD), n
    c = _layout_cache
    if c[0] is not None and c[0]() is x_TD and c[1] == x_TD._version and c[2] == B:
        return cast(torch.Tensor, c[3]), int(c[4])
    with _untracked():
        pos_T, nblk = token_slots(row_bucket(x_TD, B), B)
    pos_T = _like_rows(pos_T, x_TD)
    c[:] = [weakref.ref(x_TD), x_TD._version, B, pos_T, nblk]
    return pos_T, nblk


def swiglu_block(x_BD: torch.Tensor, w1_FD: torch.Tensor, w2_DF: torch.Tensor, w3_FD: torch.Tensor) -> torch.Tensor:
    """One block through one SwiGLU expert: w2 @ (silu(w1 @ x) * (w3 @ x))."""
    return F.linear(F.silu(F.linear(x_BD, w1_FD)) * F.linear(x_BD, w3_FD), w2_DF)


# Kept for callers of the per-row era.
swiglu_row = swiglu_block


def grouped_swiglu_rows(
    x_RD: Float[Placed[Var[EP]], "R D"], w1_EFD: torch.Tensor, w2_EDF: torch.Tensor, w3_EFD: torch.Tensor,
    counts_e: Int[Placed[Var[EP]], " e"],
) -> Float[Placed[Var[EP]], "R D"]:
    """The grouped experts, batch-invariantly. Rows are grouped by expert (counts_e
    rows each); rows past sum(counts_e) belong to no local expert and come out zero.

    CUDA: the Triton grouped GEMM (fixed tiles, fixed K order). CPU: per expert, blocks
    of BLOCK_ROWS rows at content-addressed slots, one SwiGLU call per block."""
    if _use_triton(x_RD):
        from spmd_moe.kernels import invariant_gemm

        y = invariant_gemm.grouped_swiglu(x_RD, w1_EFD, w2_EDF, w3_EFD, counts_e)
        return unchecked_cast(Placed[Var[EP]], y, reason="this rank's experts on the rows it holds")
    R = x_RD.shape[0]
    e = counts_e.shape[0]
    B = BLOCK_ROWS
    ends_e = torch.cumsum(counts_e.to(torch.int64), 0)
    n_local = int(ends_e[-1]) if e else 0  # host sync: the block layout needs it
    x_loc = x_RD[:n_local]
    with _untracked():
        pos_R, nblk_e = block_slots(ends_e, row_bucket(x_loc), B)
    pos_R = _like_rows(pos_R, x_loc)
    outs: list[torch.Tensor] = []
    if n_local:
        nblk = sum(nblk_e)
        xb_ND = x_loc.new_zeros(nblk * B, x_loc.shape[1]).index_copy(0, pos_R, x_loc)
        w13_EKD = torch.cat([w1_EFD, w3_EFD], dim=1)  # w1 | w3: one [B, 2F] GEMM per block
        block_expert = [ex for ex, nb in enumerate(nblk_e) for _ in range(nb)]
        yb: torch.Tensor = _ExpertBlocks.apply(xb_ND, w13_EKD, w2_EDF, block_expert, B)  # type: ignore[no-untyped-call]
        outs = [yb.index_select(0, pos_R)]
    if R > n_local or not outs:
        # Zeros that stay in the autograd graph of x (the dimension in equals the one
        # out): a rank with no local rows must still send gradients through the
        # dispatcher's collectives in backward, or the ranks' backward passes diverge.
        outs.append(x_RD[n_local:] * 0)
    return unchecked_cast(Placed[Var[EP]], torch.cat(outs), reason="this rank's experts on the rows it holds")


def _block_views(t: torch.Tensor, B: int) -> tuple[torch.Tensor, ...]:
    """[nblk*B, n] -> nblk [B, n] views; each is a fixed-shape, 64-byte aligned operand
    when B*n*itemsize is a multiple of 64 (else each view is a fresh copy)."""
    views: tuple[torch.Tensor, ...] = t.view(-1, B, t.shape[-1]).unbind(0)
    if (B * t.shape[-1] * t.element_size()) % _ALIGN:
        return tuple(v.clone() for v in views)
    return views


@spmd.register_local_autograd_function  # per-rank block GEMMs, no communication: placements propagate
class _ExpertBlocks(torch.autograd.Function):
    """SwiGLU of every expert block: y = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, block by block.

    What depends on the rows' position runs once per block with the same shapes,
    strides and alignment: the GEMMs (forward and input gradient) and the sigmoid (a
    transcendental op: vector body vs scalar tail). What is exact anywhere (IEEE mul,
    add, sub: correctly rounded in the vector and the scalar paths alike) runs once on
    the whole buffer: silu(a) = a * sigmoid(a), the products, silu's derivative. Weight
    gradients are sums over rows (one GEMM per expert; not part of the claim)."""

    @staticmethod
    def forward(ctx: Any, xb_ND: torch.Tensor, w13_EKD: torch.Tensor, w2_EDF: torch.Tensor,
                block_expert: list[int], B: int) -> torch.Tensor:
        Fh = w2_EDF.shape[2]
        xs = _block_views(xb_ND, B)
        w13s = {e: _aligned(w13_EKD[e]) for e in set(block_expert)}
        w2s = {e: _aligned(w2_EDF[e]) for e in set(block_expert)}
        a_list, s_list = [], []
        for b, e in enumerate(block_expert):
            a = torch.mm(xs[b], w13s[e].t())
            a_list.append(a)
            s_list.append(torch.sigmoid(a[:, :Fh]))
        a13, sig = torch.cat(a_list), torch.cat(s_list)
        a1, a3 = a13[:, :Fh], a13[:, Fh:]
        h = a1 * sig * a3
        hs = _block_views(h, B)
        y = torch.cat([torch.mm(hs[b], w2s[e].t()) for b, e in enumerate(block_expert)])
        ctx.save_for_backward(xb_ND, w13_EKD, w2_EDF, a13, sig, h)
        ctx.block_expert, ctx.B = block_expert, B
        return y

    @staticmethod
    def backward(ctx: Any, gy_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xb, w13_EKD, w2_EDF, a13, sig, h = ctx.saved_tensors
        be, B = ctx.block_expert, ctx.B
        Fh = w2_EDF.shape[2]
        gy_ND = gy_ND.contiguous()
        gys = _block_views(gy_ND, B)
        w13s = {e: _aligned(w13_EKD[e]) for e in set(be)}
        w2s = {e: _aligned(w2_EDF[e]) for e in set(be)}
        gh = torch.cat([torch.mm(gys[b], w2s[e]) for b, e in enumerate(be)])
        a1, a3 = a13[:, :Fh], a13[:, Fh:]
        silu = a1 * sig
        # d silu(a)/da = s * (1 + a * (1 - s)), each op exact elementwise.
        ga13 = torch.cat([gh * a3 * (sig * (1 + a1 * (1 - sig))), gh * silu], dim=1)
        gas = _block_views(ga13, B)
        gx = torch.cat([torch.mm(gas[b], w13s[e]) for b, e in enumerate(be)]) if ctx.needs_input_grad[0] else None
        gw13 = gw2 = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gw13, gw2 = torch.zeros_like(w13_EKD), torch.zeros_like(w2_EDF)
            start = 0
            for e in sorted(set(be)):
                nb = be.count(e)
                rows = slice(start * B, (start + nb) * B)
                gw13[e] = ga13[rows].t() @ xb[rows]
                gw2[e] = gy_ND[rows].t() @ h[rows]
                start += nb
        return gx, gw13, gw2, None, None


class _OrderedReduceScatter(torch.autograd.Function):
    """Sum of every rank's [n*t, D] partial, added in rank order, this rank's chunk kept.
    Backward: every rank's partial gets the whole gradient (all_gather of the chunks)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, n: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.n = group, n
        x = x.contiguous()
        flat = x.new_empty((n * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(flat, x, group=group)
        everyone = flat.view(n, *x.shape)
        acc = everyone[0]
        for r in range(1, n):
            acc = acc + everyone[r]
        return acc.chunk(n, dim=0)[rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = grad.contiguous()
        buf = grad.new_empty((ctx.n * grad.shape[0], *grad.shape[1:]))
        dist.all_gather_into_tensor(buf, grad, group=ctx.group)
        return buf, None, None, None


def ordered_reduce_scatter(x_TD: Float[Placed[Par[EP]], "T D"], group: Any, n: int, rank: int) -> Float[Placed[Var[EP]], "t D"]:
    """P -> V like reduce_scatter, but the n summands are added in rank order, so the
    result does not depend on which rank's chunk a token landed in."""
    if n == 1:
        return unchecked_cast(Placed[Var[EP]], x_TD, reason="one rank: the Partial sum is this rank's value")
    if not spmd.is_type_checking():
        out: Placed[Var[EP]] = _OrderedReduceScatter.apply(x_TD, group, n, rank)  # type: ignore[no-untyped-call]
        return out
    # Debug mode's tracked region: the exchange is untracked, its result is V (as
    # collectives.all_to_all does for its own autograd Function).
    with spmd.no_typecheck():
        out = _OrderedReduceScatter.apply(x_TD, group, n, rank)  # type: ignore[no-untyped-call]
    spmd.assert_type(out, {group: spmd.V})
    return out
