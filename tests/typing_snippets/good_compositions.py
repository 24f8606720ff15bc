"""Correct compositions: every placement change goes through a typed collective or an
explicit as_* statement. mypy must accept this file with no error."""

import torch
from jaxtyping import Float

from spmd_moe import collectives as C
from spmd_moe.experts import GroupedExperts, SharedExperts
from spmd_moe.moe import MoE
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import Par, Rep, Var, as_par, as_rep, as_var
from spmd_moe.router import TopKRouter


def replicated_layer(moe: MoE, x: torch.Tensor) -> Rep:
    return moe.forward_replicated(as_rep(x, moe.pctx, "x_TD"))


def sequence_layer(moe: MoE, x_TD: Var) -> Float[Var, "T D"]:
    return moe.forward_sequence(x_TD)


def route_my_slice(router: TopKRouter, x_TD: Rep, pctx: ParallelContext) -> Var:
    x_loc_TD = C.split_tokens(x_TD, pctx)
    weights_TK, expert_ids_TK, scores_TE = router.forward(x_loc_TD)
    return weights_TK


def shared_then_add(se: SharedExperts, x_TD: Rep, y_TD: Var, pctx: ParallelContext) -> Rep:
    shared_TD: Var = C.reduce_scatter(se.forward(x_TD), pctx)
    return C.all_gather(as_var(y_TD + shared_TD), pctx)


def global_counts(counts_E: Var, pctx: ParallelContext) -> Rep:
    return C.all_reduce(C.partial_from_shards(counts_E, pctx), pctx)


def experts_on_rows(experts: GroupedExperts, rows_RD: Var, counts_e: Var) -> Var:
    return experts.forward(rows_RD, counts_e)


def exchange(rows_ND: Var, pctx: ParallelContext) -> Var:
    return C.all_to_all(rows_ND, pctx, [2, 1], [1, 2])


def a_partial_sum(x: torch.Tensor) -> Par:
    return as_par(x)


def decode_view(x_TD: Var, pctx: ParallelContext) -> Var:
    return C.rank_view(C.all_gather(x_TD, pctx), pctx)
