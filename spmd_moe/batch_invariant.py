"""Batch-invariant mode: a token's MoE output does not depend on the rest of the batch.

Why a mode is needed. A GEMM kernel picks its blocking (and so the order in which it
adds the products of one dot product) from the matrix shapes; on CPU (torch 2.13,
MKL/oneDNN) ``x[:M] @ W`` gives a different first row for M >= 7 than for M = 1, and
F.linear already differs at M = 2. Elementwise transcendental ops (exp in softmax,
sigmoid, SiLU) are vectorized over the flattened tensor with a scalar tail and split
over threads by element count, so where a token's elements fall also depends on the
batch. In an MoE the rows an expert sees are whatever tokens chose it, so without a
fix the output of a token depends on its batch neighbours, on the EP degree and on
the dispatcher.

What the mode does (fixed shapes, fixed order):

* the router runs one token at a time (the gate GEMM, softmax/sigmoid, top-k and the
  route normalisation all see a [1, ...] tensor);
* every routed row runs its expert's whole SwiGLU (three GEMMs, SiLU, product) as a
  [1, D] row, and so does every row of the shared experts;
* the shared experts' Partial sums are added in rank order (all_gather + an ordered
  sum) instead of the collective's own reduction order;
* everything else was already exact: moving rows (gather, index_copy, all_to_all,
  all_gather), adding the exact zeros of the all-gather dispatcher, the combine's
  fp32 products and its sum in ascending expert id.

So a token's output is a function of that token, the weights and the EP degree only.
It costs speed (one small GEMM per row, a host sync for the per-expert row counts):
it is meant for RL parity checks (trainer vs generator) and tests, not for
throughput. Backward stays correct (autograd runs through the per-row ops); only the
forward values are guaranteed batch-invariant.

Turn it on with ``with spmd_moe.batch_invariant():``, ``set_batch_invariant(True)``
or the environment variable ``SPMD_MOE_BATCH_INVARIANT=1`` (read at import; handy for
spawned workers such as vLLM's).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import spmd_types as spmd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float, Int

from spmd_moe.placement import EP, Par, Placed, Var, unchecked_cast

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


def _row(x: _X, i: int) -> _X:
    # A fresh [1, D] tensor: same shape, contiguity and allocator alignment for every
    # row, wherever the row sat in its batch. clone() is differentiable.
    return cast(_X, x[i : i + 1].clone())  # a row keeps x's placement


def rowwise(fn: Callable[[_X], _Y], x_TD: _X) -> _Y:
    """Apply fn to each row of x_TD as a [1, D] tensor and concatenate the results
    (fn returns a tensor or a tuple of tensors, each with a leading dim of 1). Rows
    keep x_TD's placement and concatenating rows keeps fn's: the types pass through."""
    T = x_TD.shape[0]
    outs: list[Any] = [fn(_row(x_TD, i)) for i in range(T)]
    if not outs:
        # No rows: run one zero row that is still attached to x_TD's graph, keep 0 rows.
        probe: Any = fn(cast(_X, torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])))
        if isinstance(probe, tuple):
            return cast(_Y, tuple(p[:0] for p in probe))
        return cast(_Y, probe[:0])
    if isinstance(outs[0], tuple):
        return cast(_Y, tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))))
    return cast(_Y, torch.cat(outs))


def swiglu_row(x_1D: torch.Tensor, w1_FD: torch.Tensor, w2_DF: torch.Tensor, w3_FD: torch.Tensor) -> torch.Tensor:
    """One token through one SwiGLU expert: w2 @ (silu(w1 @ x) * (w3 @ x)), as [1, D]."""
    return F.linear(F.silu(F.linear(x_1D, w1_FD)) * F.linear(x_1D, w3_FD), w2_DF)


def grouped_swiglu_rows(
    x_RD: Float[Placed[Var[EP]], "R D"], w1_EFD: torch.Tensor, w2_EDF: torch.Tensor, w3_EFD: torch.Tensor,
    counts_e: Int[Placed[Var[EP]], " e"],
) -> Float[Placed[Var[EP]], "R D"]:
    """The grouped experts, one row at a time. Rows are grouped by expert (counts_e
    rows each); rows past sum(counts_e) belong to no local expert and come out zero."""
    sizes = [int(c) for c in counts_e.tolist()]  # host sync: this mode trades speed for invariance
    R = x_RD.shape[0]
    outs: list[torch.Tensor] = []
    start = 0
    for e, n in enumerate(sizes):
        w1, w2, w3 = w1_EFD[e], w2_EDF[e], w3_EFD[e]
        for i in range(start, start + n):
            outs.append(swiglu_row(_row(x_RD, i), w1, w2, w3))
        start += n
    if R > start or not outs:
        # Zeros that stay in the autograd graph of x (the dimension in equals the one
        # out): a rank with no local rows must still send gradients through the
        # dispatcher's collectives in backward, or the ranks' backward passes diverge.
        outs.append(x_RD[start:] * 0)
    return unchecked_cast(Placed[Var[EP]], torch.cat(outs), reason="this rank's experts on the rows it holds")


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
