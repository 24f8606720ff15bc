"""FORBIDDEN['partial_through_function']: a tensor Partial on an axis the called
function's signature does not name (the function runs replicated over that axis)."""

from spmd_moe.placement import DP, EP, Par, Placed, Rep, Var
from spmd_moe.router import TopKRouter


def layer_on_ep(x_TD: Placed[Var[EP]]) -> Placed[Var[EP]]:
    return x_TD


def partial_over_dp(x_TD: Placed[Var[EP], Par[DP]], r_TD: Placed[Var[EP], Rep[DP]]) -> None:
    layer_on_ep(x_TD)  # E: placement rule 'partial_through_function' on axis 'DP'
    layer_on_ep(r_TD)


def partial_over_dp_into_the_router(router: TopKRouter, x_TD: Placed[Var[EP], Par[DP]]) -> None:
    router(x_TD)  # E: placement rule 'partial_through_function' on axis 'DP'
