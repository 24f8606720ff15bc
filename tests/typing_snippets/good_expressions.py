"""Correct, placement-preserving expressions: mypy (with spmd_moe.mypy_plugin) infers each
result's placement with no cast and no restatement. ``assert_type`` fails the snippet if
the inferred placement is not the one written."""

from typing import assert_type

import torch
import torch.nn.functional as F

from spmd_moe import collectives as C
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Inv, Par, Placed, Rep, Var, as_rep, as_var


def the_five(v: Placed[Var[EP]], p: Placed[Par[EP]], r: Placed[Rep[EP]], T: int) -> None:
    assert_type(v * 0.5, Placed[Var[EP]])
    assert_type(v.to(torch.bfloat16), Placed[Var[EP]])
    assert_type(p * 2.0, Placed[Par[EP]])
    assert_type(r[:T], Placed[Rep[EP]])
    assert_type(F.silu(r), Placed[Rep[EP]])


def more_ops(v: Placed[Var[EP]], r: Placed[Rep[EP]], p: Placed[Par[EP]], i: Placed[Inv[EP]]) -> None:
    assert_type(v + r, Placed[Var[EP]])  # R and V mix to V
    assert_type(p + p, Placed[Par[EP]])  # a sum of partial sums
    assert_type(p @ r, Placed[Par[EP]])  # one Partial factor
    assert_type(F.linear(v, r), Placed[Var[EP]])
    assert_type(torch.cat([v, v]), Placed[Var[EP]])
    assert_type(p.sum(dim=0), Placed[Par[EP]])
    assert_type(i * 3.0, Placed[Inv[EP]])
    assert_type(torch.softmax(v.float(), dim=-1), Placed[Var[EP]])
    weights_TK, ids_TK = v.topk(2, dim=-1)
    assert_type(ids_TK, Placed[Var[EP]])
    assert_type(v.topk(2, dim=-1).indices, Placed[Var[EP]])
    assert_type(v > 0, Placed[Var[EP]])
    assert_type(torch.where(v > 0, v, 0.0), Placed[Var[EP]])
    assert_type(v.reshape(-1).unsqueeze(0), Placed[Var[EP]])
    assert_type(v + torch.arange(3), Placed[Var[EP]])  # an untyped tensor adopts V


def collectives(v: Placed[Var[EP]], p: Placed[Par[EP]], r: Placed[Rep[EP]], i: Placed[Inv[EP]], ep: ParallelContext[EP]) -> None:
    assert_type(C.all_gather(v, ep), Placed[Rep[EP]])
    assert_type(C.split_tokens(r, ep), Placed[Var[EP]])
    assert_type(C.reduce_scatter(p, ep), Placed[Var[EP]])
    assert_type(C.all_reduce(p, ep), Placed[Rep[EP]])
    assert_type(C.all_to_all(v, ep, [1, 1], [1, 1]), Placed[Var[EP]])
    assert_type(C.partial_from_shards(v, ep), Placed[Par[EP]])
    assert_type(C.rank_view(r, ep), Placed[Var[EP]])
    assert_type(C.invariant_to_replicate(i, ep), Placed[Rep[EP]])
    assert_type(C.replicate_to_invariant(r, ep), Placed[Inv[EP]])
    # Local counts are summands of the global count: V -> P -> R.
    assert_type(C.all_reduce(C.partial_from_shards(v, ep), ep), Placed[Rep[EP]])


def two_axes(x: torch.Tensor, ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
    x_TD = as_var(as_rep(x, ep, "x_TD"), dp, "x_TD")  # stating: untyped input, one axis at a time
    assert_type(x_TD, Placed[Var[DP], Rep[EP]])
    assert_type(x_TD, Placed[Rep[EP], Var[DP]])  # axis order does not matter
    h_TD = C.split_tokens(x_TD, ep)  # changes ep only
    assert_type(h_TD, Placed[Var[EP], Var[DP]])
    loss = C.all_reduce(C.partial_from_shards(h_TD.float().square().sum(), dp), dp)
    assert_type(loss, Placed[Var[EP], Rep[DP]])


def layer_on_ep(x_TD: Placed[Var[EP]]) -> Placed[Var[EP]]:
    return F.silu(x_TD) * 2.0


def unnamed_axes_pass_through(x_TD: Placed[Var[EP], Var[DP]], r_TD: Placed[Var[EP], Rep[DP]]) -> None:
    assert_type(layer_on_ep(x_TD), Placed[Var[EP], Var[DP]])
    assert_type(layer_on_ep(r_TD), Placed[Var[EP], Rep[DP]])
