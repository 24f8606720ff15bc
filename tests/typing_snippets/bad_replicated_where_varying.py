"""Replicate tokens where a Varying slice is required: a missing split_tokens."""

from spmd_moe.moe import MoE
from spmd_moe.placement import Rep, Var
from spmd_moe.router import TopKRouter


def routes_all_tokens(router: TopKRouter, x_TD: Rep) -> Var:
    w, ids, scores = router.forward(x_TD)  # E: Argument 1 to "forward" of "TopKRouter" has incompatible type "Rep"; expected "Var"
    return w


def wrong_layout(moe: MoE, x_TD: Rep) -> Var:
    return moe.forward_sequence(x_TD)  # E: Argument 1 to "forward_sequence" of "MoE" has incompatible type "Rep"; expected "Var"


def var_into_replicated_layout(moe: MoE, x_TD: Var) -> Rep:
    return moe.forward_replicated(x_TD)  # E: Argument 1 to "forward_replicated" of "MoE" has incompatible type "Var"; expected "Rep"
