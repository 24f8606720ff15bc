"""A Partial tensor where a Replicate one is required: a missing all_reduce."""

from spmd_moe import collectives as C
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import Par, Rep, Var


def uses_replicated(x: Rep) -> Rep:
    return x


def forgot_all_reduce(p: Par) -> Rep:
    return uses_replicated(p)  # E: Argument 1 to "uses_replicated" has incompatible type "Par"; expected "Rep"


def gathers_a_partial(p: Par, pctx: ParallelContext) -> Rep:
    return C.all_gather(p, pctx)  # E: Argument 1 to "all_gather" has incompatible type "Par"; expected "Var"


def reduces_twice(p: Par, pctx: ParallelContext) -> Rep:
    r = C.all_reduce(p, pctx)
    return C.all_reduce(r, pctx)  # E: Argument 1 to "all_reduce" has incompatible type "Rep"; expected "Par"


def splits_a_partial(p: Par, pctx: ParallelContext) -> Var:
    return C.split_tokens(p, pctx)  # E: Argument 1 to "split_tokens" has incompatible type "Par"; expected "Rep"
