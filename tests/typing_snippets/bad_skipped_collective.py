"""A collective left out: the shared expert's Partial output used as the Varying one."""

from spmd_moe import collectives as C
from spmd_moe.experts import SharedExperts
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import Par, Rep, Var


def shared_without_reduce_scatter(se: SharedExperts, x_TD: Rep) -> Var:
    return se.forward(x_TD)  # E: Incompatible return value type (got "Par", expected "Var")


def adds_partial_to_varying(se: SharedExperts, x_TD: Rep, y_TD: Var, pctx: ParallelContext) -> Var:
    shared_TD: Var = se.forward(x_TD)  # E: Incompatible types in assignment (expression has type "Par", variable has type "Var")
    return C.all_to_all(shared_TD, pctx, [1], [1])


def reduce_scatter_of_varying(y_TD: Var, pctx: ParallelContext) -> Var:
    return C.reduce_scatter(y_TD, pctx)  # E: Argument 1 to "reduce_scatter" has incompatible type "Var"; expected "Par"


def counts_without_reinterpret(counts_E: Var, pctx: ParallelContext) -> Rep:
    return C.all_reduce(counts_E, pctx)  # E: Argument 1 to "all_reduce" has incompatible type "Var"; expected "Par"


def unused(p: Par) -> None:
    del p
