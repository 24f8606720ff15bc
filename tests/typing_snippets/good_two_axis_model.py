"""A user's two-axis model typed with spmd_moe: sequence-parallel tokens Varying on the
expert axis ``EP`` and on a data axis ``DP``. mypy with spmd_moe.mypy_plugin infers
every placement below; docs/placements.md walks through it."""

from typing import assert_type

import torch
import torch.nn.functional as F
from torch import nn

from spmd_moe import collectives as C
from spmd_moe.moe import MoE, Sequence
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Placed, Rep, Var, as_rep, as_var

Tokens = Placed[Var[EP], Var[DP]]  # this rank's token slice of this data-parallel replica


class Block(nn.Module):
    def __init__(self, moe: MoE[Sequence], ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
        super().__init__()
        self.moe, self.ep, self.dp = moe, ep, dp
        self.norm_w = nn.Parameter(torch.ones(64))

    def forward(self, x_TD: Tokens) -> Tokens:
        w_D = as_rep(as_rep(self.norm_w, self.ep, "norm_w"), self.dp, "norm_w")  # a parameter: stated once
        h_TD = F.rms_norm(x_TD, (64,), w_D)  # non-linear, fine on Varying tokens
        y_TD = self.moe(h_TD)  # MoE names EP only: DP passes through as Varying
        assert_type(y_TD, Tokens)
        return x_TD + y_TD


def mean_loss(y_TD: Tokens, ep: ParallelContext[EP], dp: ParallelContext[DP]) -> Placed[Rep[EP], Rep[DP]]:
    local = y_TD.float().square().sum()  # this rank's summand: Varying on both axes
    over_ep = C.all_reduce(C.partial_from_shards(local, ep), ep)  # V -> P -> R on EP
    return C.all_reduce(C.partial_from_shards(over_ep, dp), dp)  # and on DP


def step(block: Block, batch: torch.Tensor, ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
    x_TD = as_var(as_var(batch, ep, "x_TD"), dp, "x_TD")  # the input states its placements
    loss = mean_loss(block(x_TD), ep, dp)
    assert_type(loss, Placed[Rep[EP], Rep[DP]])
