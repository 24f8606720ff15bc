"""FORBIDDEN['collective_input'] and every `forbidden` pair of the collective rules in
typing_rules.rules: a collective given a placement it does not take, or run on an axis
where the tensor does not have the placement it takes."""

from spmd_moe import collectives as C
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Par, Placed, Rep, Var


def forbidden_pairs(r: Placed[Rep[EP]], v: Placed[Var[EP]], ep: ParallelContext[EP]) -> None:
    C.split_tokens(v, ep)  # E: split_tokens(x_TD) on axis EP: expected Replicate (R), got Varying on EP
    C.all_gather(r, ep)  # E: all_gather(x_TD) on axis EP: expected Varying (V), got Replicate on EP
    C.reduce_scatter(r, ep)  # E: reduce_scatter(x_TD) on axis EP: expected Partial (P), got Replicate on EP
    C.all_reduce(r, ep)  # E: all_reduce(x) on axis EP: expected Partial (P), got Replicate on EP


def forbidden_pairs_say_why(r: Placed[Rep[EP]], v: Placed[Var[EP]], ep: ParallelContext[EP]) -> None:
    C.split_tokens(v, ep)  # E: splitting an already split slice would drop tokens
    C.all_gather(r, ep)  # E: gathering a Replicate tensor repeats it n times
    C.all_reduce(r, ep)  # E: summing a Replicate tensor multiplies it by n


def other_wrong_inputs(p: Placed[Par[EP]], v: Placed[Var[EP]], ep: ParallelContext[EP]) -> None:
    C.all_gather(p, ep)  # E: a collective given a placement it does not take
    C.all_reduce(v, ep)  # E: all_reduce(x) on axis EP: expected Partial (P), got Varying on EP
    C.rank_view(v, ep)  # E: rank_view(x) on axis EP: expected Replicate (R), got Varying on EP


def wrong_axis(x: Placed[Var[DP], Rep[EP]], ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
    C.all_gather(x, ep)  # E: all_gather(x_TD) on axis EP: expected Varying (V), got Replicate on EP
    C.all_gather(x, dp)
    C.split_tokens(x, dp)  # E: split_tokens(x_TD) on axis DP: expected Replicate (R), got Varying on DP
