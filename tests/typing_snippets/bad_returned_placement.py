"""A function that declares one placement and returns another, or returns an unplaced tensor."""

import torch

from spmd_moe import collectives as C
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import Inv, Rep, Var


def slice_declared_replicated(y_TD: Var) -> Rep:
    return y_TD  # E: Incompatible return value type (got "Var", expected "Rep")


def arithmetic_drops_the_placement(y_TD: Var) -> Var:
    return y_TD * 2  # E: Incompatible return value type (got "Tensor", expected "Var")


def unplaced_into_collective(pctx: ParallelContext) -> Rep:
    return C.all_gather(torch.zeros(4, 2), pctx)  # E: Argument 1 to "all_gather" has incompatible type "Tensor"; expected "Var"


def invariant_is_not_replicate(w: Inv) -> Rep:
    return w  # E: Incompatible return value type (got "Inv", expected "Rep")
