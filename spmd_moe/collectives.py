"""Typed collectives over the expert axis.

Each function's signature is its placement transition (``all_gather: Placed[Var[A]] -> Placed[Rep[A]]``), so a
missing or wrong collective is a mypy error. With autograd on they go through
spmd_types' differentiable collectives on ``pctx.group`` (which also track placements in
debug mode); with autograd off (torch.no_grad / inference_mode, as vLLM runs) and debug
off they call the context's communicator ``pctx.comm`` (spmd_moe.comm: torch.distributed
by default, vLLM's device communicator inside vLLM, functional collectives on a
DeviceMesh), which only moves bytes. On an axis of size 1 each is the identity.
Those two untracked branches return a plain tensor under the function's stated placement
(their ``type: ignore[return-value]``): the signature is the statement, and
tests/test_rules_runtime.py checks each transition on gloo ranks, tests/test_comm_backends.py
that every backend gives the same bits.

Tokens are split over the axis in equal contiguous chunks (S(0)), so all_gather
concatenates and reduce_scatter splits along dim 0.
"""

from __future__ import annotations

from typing import Any

import spmd_types as spmd
import torch
import typing_rules

from spmd_moe.comm import Comm
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import A, Inv, Par, Placed, Rep, Var
from spmd_moe.checking import check_placement

S0 = spmd.S(0)


def _check_in(op: str, x: torch.Tensor, pctx: ParallelContext[Any]) -> None:
    """With placements tracked (debug mode, >1 rank): the input placement that
    typing_rules states for ``op``, as a PlacementError with a fix."""
    if spmd.is_type_checking():
        check_placement(x, f"{op} input", typing_rules.input_placement(op), pctx)


def _autograd(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def split_tokens(x_TD: Placed[Rep[A]], pctx: ParallelContext[A]) -> Placed[Var[A]]:
    """R -> V: keep this rank's contiguous chunk of dim 0 (len divisible by the size).

    Backward (R's gradient is Partial): the chunk's gradient placed into zeros.
    """
    if pctx.size == 1:
        return x_TD  # type: ignore[return-value]
    if _autograd(x_TD) or spmd.is_type_checking():
        _check_in("split_tokens", x_TD, pctx)
        out: Placed[Var[A]] = spmd.convert(x_TD, pctx.group, src=spmd.R, dst=S0)
        return out
    return x_TD.chunk(pctx.size, dim=0)[pctx.rank]  # type: ignore[return-value]


def all_gather(x_TD: Placed[Var[A]], pctx: ParallelContext[A]) -> Placed[Rep[A]]:
    """V -> R: concatenate every rank's chunk along dim 0 (equal sizes)."""
    if pctx.size == 1:
        return x_TD  # type: ignore[return-value]
    if _autograd(x_TD) or spmd.is_type_checking():
        _check_in("all_gather", x_TD, pctx)
        # The backward's reduce_scatter sums in the input's dtype (bf16 stays bf16, as a plain
        # torch.distributed reduction of bf16 gradients would); spmd_types asks us to say so.
        out: Placed[Rep[A]] = spmd.all_gather(x_TD, pctx.group, src=S0, dst=spmd.R,
                                              backward_options={"op_dtype": x_TD.dtype})
        return out
    return pctx.backend.all_gather(x_TD.contiguous())  # type: ignore[return-value]


def reduce_scatter(x_TD: Placed[Par[A]], pctx: ParallelContext[A]) -> Placed[Var[A]]:
    """P -> V: sum over ranks, keep this rank's chunk of dim 0."""
    if pctx.size == 1:
        return x_TD  # type: ignore[return-value]
    if _autograd(x_TD) or spmd.is_type_checking():
        _check_in("reduce_scatter", x_TD, pctx)
        out: Placed[Var[A]] = spmd.reduce_scatter(x_TD, pctx.group, src=spmd.P, dst=S0)
        return out
    return pctx.backend.reduce_scatter(x_TD.contiguous())  # type: ignore[return-value]


def all_reduce(x: Placed[Par[A]], pctx: ParallelContext[A], *, donate: bool = False) -> Placed[Rep[A]]:
    """P -> R: sum over ranks. ``donate``: the caller gives up ``x`` (a buffer it made),
    so the communicator may reduce in place instead of on a copy."""
    if pctx.size == 1:
        return x  # type: ignore[return-value]
    if _autograd(x) or spmd.is_type_checking():
        _check_in("all_reduce", x, pctx)
        out: Placed[Rep[A]] = spmd.all_reduce(x, pctx.group, src=spmd.P, dst=spmd.R)
        return out
    own = x if donate and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    return pctx.backend.all_reduce(own)  # type: ignore[return-value]


class _AllToAllSingle(torch.autograd.Function):
    """Uneven all_to_all along dim 0 (all_to_all_single: gloo and NCCL both have it);
    the backward is the mirror exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        ctx.comm, ctx.in_splits, ctx.out_splits = comm, in_splits, out_splits
        return comm.all_to_all(x.contiguous(), in_splits, out_splits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.comm.all_to_all(grad.contiguous(), ctx.out_splits, ctx.in_splits), None, None, None


def all_to_all(x_ND: Placed[Var[A]], pctx: ParallelContext[A], in_splits: list[int], out_splits: list[int]) -> Placed[Var[A]]:
    """V -> V: send rows [in_splits[j]] to rank j, receive out_splits[j] rows from j."""
    if pctx.size == 1:
        return x_ND
    if not _autograd(x_ND):
        return pctx.backend.all_to_all(x_ND.contiguous(), in_splits, out_splits)  # type: ignore[return-value]
    if spmd.is_type_checking():
        _check_in("all_to_all", x_ND, pctx)
        with spmd.no_typecheck():
            out = _AllToAllSingle.apply(x_ND, pctx.backend, in_splits, out_splits)  # type: ignore[no-untyped-call]
        spmd.assert_type(out, {pctx.group: spmd.V})
        return out  # type: ignore[no-any-return]
    return _AllToAllSingle.apply(x_ND, pctx.backend, in_splits, out_splits)  # type: ignore[no-any-return, no-untyped-call]


def partial_from_shards(x: Placed[Var[A]], pctx: ParallelContext[A]) -> Placed[Par[A]]:
    """V -> P with no communication: the local products of a hidden dim sharded over
    the axis are the summands of the full product (row-parallel linear)."""
    if pctx.size == 1 or not spmd.is_type_checking():
        return x  # type: ignore[return-value]
    _check_in("row_parallel", x, pctx)
    out: Placed[Par[A]] = spmd.reinterpret(x, pctx.group, src=spmd.V, dst=spmd.P)
    return out


def rank_view(x: Placed[Rep[A]], pctx: ParallelContext[A]) -> Placed[Var[A]]:
    """R -> V with no communication: each rank uses the same replicated value in its own
    way (e.g. keeps the rows of its own experts). Backward: per-rank gradients are
    summands of the replicated input's gradient (V -> P, no-op)."""
    if pctx.size == 1 or not spmd.is_type_checking():
        return x  # type: ignore[return-value]
    _check_in("rank_view", x, pctx)
    out: Placed[Var[A]] = spmd.reinterpret(x, pctx.group, src=spmd.R, dst=spmd.V, expert_mode=True)
    return out


def invariant_to_replicate(x: Placed[Inv[A]], pctx: ParallelContext[A]) -> Placed[Rep[A]]:
    """I -> R with no communication forward; backward sums the Partial gradient over the
    axis (P -> I): Megatron's "copy to tensor-parallel region" at a replicated-activation
    model's entry into the layer."""
    if pctx.size == 1:
        return x  # type: ignore[return-value]
    if _autograd(x) or spmd.is_type_checking():
        _check_in("invariant_to_replicate", x, pctx)
        # The backward's all_reduce sums in the input's dtype (see all_gather above).
        out: Placed[Rep[A]] = spmd.convert(x, pctx.group, src=spmd.I, dst=spmd.R,
                                           backward_options={"op_dtype": x.dtype})
        return out
    return x  # type: ignore[return-value]


def replicate_to_invariant(x: Placed[Rep[A]], pctx: ParallelContext[A]) -> Placed[Inv[A]]:
    """R -> I with no communication forward; backward turns the complete (Invariant)
    gradient of every rank into Partial summands (I -> P): the layer's exit back into
    a replicated-activation model."""
    if pctx.size == 1:
        return x  # type: ignore[return-value]
    if _autograd(x) or spmd.is_type_checking():
        _check_in("replicate_to_invariant", x, pctx)
        out: Placed[Inv[A]] = spmd.convert(x, pctx.group, src=spmd.R, dst=spmd.I, expert_mode=True)
        return out
    return x  # type: ignore[return-value]
