"""Mistakes in a user's two-axis model (see good_two_axis_model.py): mypy with the
spmd_moe plugin rejects each marked line."""

import torch
import torch.nn.functional as F

from spmd_moe import collectives as C
from spmd_moe.moe import MoE, Replicated, Sequence
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Par, Placed, Rep, Var

Tokens = Placed[Var[EP], Var[DP]]


def loss_reduced_over_the_wrong_axis(y_TD: Tokens, ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
    local = y_TD.float().square().sum()
    C.all_reduce(C.partial_from_shards(local, ep), dp)  # E: all_reduce(x) on axis DP: expected Partial (P), got Varying


def loss_not_reduced(y_TD: Tokens) -> Placed[Rep[EP], Rep[DP]]:
    return y_TD.float().square().sum()  # E: Incompatible return value type


def gathered_on_the_wrong_axis(y_TD: Placed[Var[DP], Rep[EP]], ep: ParallelContext[EP]) -> None:
    C.all_gather(y_TD, ep)  # E: all_gather(x_TD) on axis EP: expected Varying (V), got Replicate on EP


def replicated_layer_given_token_slices(moe: MoE[Replicated], x_TD: Tokens) -> None:
    moe(x_TD)  # E: Argument 1 to "forward" of "MoE" has incompatible type


def partial_over_dp_into_the_layer(moe: MoE[Sequence], x_TD: Placed[Var[EP], Par[DP]]) -> None:
    moe(x_TD)  # E: partial_through_function


def partial_into_the_replicated_layer(moe: MoE[Replicated], p_TD: Placed[Par[EP]]) -> None:
    moe(p_TD)  # E: Argument 1 to "forward" of "MoE" has incompatible type
