"""Forbidden placement combinations in torch ops and collectives: each marked line is
rejected by mypy with the spmd_moe plugin, with the rule's reason."""

import torch
import torch.nn.functional as F

from spmd_moe import collectives as C
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Inv, Par, Placed, Rep, Var, as_rep, as_var


def partial_into_softmax(p: Placed[Par[EP]]) -> None:
    F.softmax(p, dim=-1)  # E: partial_nonlinear


def partial_times_partial(p: Placed[Par[EP]], q: Placed[Par[EP]]) -> None:
    p @ q  # E: partial_times_partial


def partial_plus_constant(p: Placed[Par[EP]], r: Placed[Rep[EP]]) -> None:
    p + 1.0  # E: partial_plus_nonpartial
    p + r  # E: partial_plus_nonpartial


def replicate_into_reducing_collective(r: Placed[Rep[EP]], ep: ParallelContext[EP]) -> None:
    C.all_reduce(r, ep)  # E: all_reduce(x) on axis EP: expected Partial (P), got Replicate
    C.reduce_scatter(r, ep)  # E: reduce_scatter(x_TD) on axis EP: expected Partial (P), got Replicate


def gathered_over_the_wrong_axis(v_dp: Placed[Var[DP], Rep[EP]], ep: ParallelContext[EP]) -> None:
    C.all_gather(v_dp, ep)  # E: all_gather(x_TD) on axis EP: expected Varying (V), got Replicate on EP


def restated(v: Placed[Var[EP]], ep: ParallelContext[EP]) -> None:
    as_rep(v, ep)  # E: as_rep: the tensor is already Varying on axis EP
    as_var(v, ep)  # E: as_var: the tensor is already Varying on axis EP


def invariant_mixed(i: Placed[Inv[EP]], r: Placed[Rep[EP]]) -> None:
    i + r  # E: invariant_mix


def partial_with_varying(p: Placed[Par[EP]], v: Placed[Var[EP]]) -> None:
    p * v  # E: partial_with_varying


def layer_on_ep(x_TD: Placed[Var[EP]]) -> Placed[Var[EP]]:
    return x_TD


def partial_through_a_layer(x_TD: Placed[Var[EP], Par[DP]]) -> None:
    layer_on_ep(x_TD)  # E: partial_through_function


def placement_lost_by_assignment(v: Placed[Var[EP]]) -> Placed[Rep[EP]]:
    return v * 2.0  # E: Incompatible return value type (got "Placed[Var[EP]]", expected "Placed[Rep[EP]]")


def plain_tensor_is_no_placement(t: torch.Tensor) -> Placed[Var[EP]]:
    return t  # E: Incompatible return value type (got "Tensor", expected "Placed[Var[EP]]")
