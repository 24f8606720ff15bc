"""Plausible wrong compositions of spmd_moe's layers in user code (issue 10's list): mypy
with the spmd_moe plugin rejects each marked line for a placement reason."""

import torch.nn.functional as F

from spmd_moe import collectives as C
from spmd_moe.experts import GroupedExperts, SharedExperts
from spmd_moe.moe import MoE, Replicated, Sequence
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Par, Placed, Rep, Var, as_rep
from spmd_moe.router import TopKRouter


def partial_into_softmax(logits_TE: Placed[Par[EP]]) -> None:
    F.softmax(logits_TE, dim=-1)  # E: partial_nonlinear


def varying_statistic_as_the_bias(router: TopKRouter, x_TD: Placed[Var[EP]], scores_TE: Placed[Var[EP]]) -> None:
    load_E = scores_TE.mean(dim=0)  # this rank's tokens only: Varying
    router(x_TD, load_E)  # E: Argument 2 to "forward" of "TopKRouter" has incompatible type "Placed[Var[EP]]"


def local_counts_stated_as_global(counts_E: Placed[Var[EP]], ep: ParallelContext[EP]) -> Placed[Rep[EP]]:
    return as_rep(counts_E, ep)  # E: as_rep: the tensor is already Varying on axis EP


def local_counts_returned_as_global(counts_E: Placed[Var[EP]]) -> Placed[Rep[EP]]:
    return counts_E * 1  # E: Incompatible return value type (got "Placed[Var[EP]]", expected "Placed[Rep[EP]]")


def shared_experts_not_reduced(se: SharedExperts, x_TD: Placed[Rep[EP]], y_TD: Placed[Var[EP]]) -> None:
    y_TD + se(x_TD)  # E: partial_with_varying


def gathered_twice(y_TD: Placed[Var[EP]], ep: ParallelContext[EP]) -> None:
    C.all_gather(C.all_gather(y_TD, ep), ep)  # E: all_gather(x_TD) on axis EP: expected Varying (V), got Replicate


def partial_into_replicated_layer(moe: MoE[Replicated], p_TD: Placed[Par[EP]]) -> None:
    moe(p_TD)  # E: Argument 1 to "forward" of "MoE" has incompatible type "Placed[Par[EP]]"


def varying_into_replicated_layer(moe: MoE[Replicated], v_TD: Placed[Var[EP]]) -> None:
    moe(v_TD)  # E: Argument 1 to "forward" of "MoE" has incompatible type "Placed[Var[EP]]"


def replicated_into_sequence_layer(moe: MoE[Sequence], r_TD: Placed[Rep[EP]]) -> None:
    moe(r_TD)  # E: Argument 1 to "forward" of "MoE" has incompatible type "Placed[Rep[EP]]"


def replicated_tokens_into_router(router: TopKRouter, x_TD: Placed[Rep[EP]]) -> None:
    router(x_TD)  # E: Argument 1 to "forward" of "TopKRouter" has incompatible type "Placed[Rep[EP]]"


def gathered_rows_into_experts(experts: GroupedExperts, rows_RD: Placed[Var[EP]], counts_e: Placed[Var[EP]], ep: ParallelContext[EP]) -> None:
    experts(C.all_gather(rows_RD, ep), counts_e)  # E: Argument 1 to "forward" of "GroupedExperts" has incompatible type "Placed[Rep[EP]]"
