"""Deliberately broken: two bugs of the torchtitan #3622 family and a padding policy
never stated, each found by `spmd-moe check` (tests/test_check_cli.py asserts it). The
correct block is examples/working_moe.py.

    spmd-moe check examples/broken_moe.py:slices_into_replicated examples/broken_moe.py:local_counts_as_global \
        examples/broken_moe.py:padding_policy_missing

* ``slices_into_replicated``: a sequence-parallel block (each rank holds its own slice
  of the tokens) whose MoE layer was built with layout 'replicated' (every rank the
  same tokens). Each rank's slice is treated as the whole batch: every rank routes its
  own tokens as if they were everyone's, and the output all-gather mixes the ranks.
  Without debug mode, equal slice sizes run silently and compute garbage.
* ``local_counts_as_global``: the block is right, but its load-imbalance figure states
  this rank's expert counts (``moe.tokens_per_expert_E``, Partial: a summand of the
  global counts) as Replicate -- a local count used as the global one. Without debug
  mode every rank reports a different "global" figure.
* ``padding_policy_missing``: a replicated-layout layer (vLLM style) whose MoEConfig
  never says what to do with a token count that does not split over the ranks
  (``padding=None``): the first decode step of one token on two ranks raises
  ``PaddingError``. Not a wrong result, a crash waiting for production.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import spmd_moe as sm
from spmd_moe.apps.check import CheckTarget
from spmd_moe.moe import Replicated
from spmd_moe.placement import EP, as_rep

D = 32


class Block(nn.Module):
    def __init__(self, pctx: sm.ParallelContext[EP], layout: str, counts: str) -> None:
        super().__init__()
        cfg = sm.MoEConfig(dim=D, hidden_dim=16, num_experts=8, top_k=2, padding="pad", shared_hidden_dim=16)
        self.pctx = pctx
        self.moe = sm.MoE(cfg, pctx, layout=layout)
        self.moe.init_states(seed=0)
        self.norm_w_D = nn.Parameter(torch.ones(D))
        self.counts = counts

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_D = as_rep(self.norm_w_D, self.pctx, "norm_w_D")
        h_TD = F.rms_norm(x_TD, (D,), w_D)
        y_TD = x_TD + self.moe(h_TD)
        if self.counts == "local":
            # BUG: this rank's counts are only its summand of the global counts.
            counts_E = as_rep(self.moe.tokens_per_expert_E, self.pctx, "tokens_per_expert_E")
        else:
            counts_E = self.moe.global_tokens_per_expert()
        imbalance = counts_E.max() / counts_E.mean().clamp(min=1.0)
        return y_TD, imbalance


def slices_into_replicated(pctx: sm.ParallelContext[EP]) -> CheckTarget:
    # BUG: the block's input is this rank's token slice, the layer expects all tokens.
    return CheckTarget(Block(pctx, layout="replicated", counts="global"), layout="sequence", dim=D)


def local_counts_as_global(pctx: sm.ParallelContext[EP]) -> CheckTarget:
    return CheckTarget(Block(pctx, layout="sequence", counts="local"), layout="sequence", dim=D)


def padding_policy_missing(pctx: sm.ParallelContext[EP]) -> sm.MoE[Replicated]:
    # BUG: no padding policy (MoEConfig.padding=None): T=1 on 2 ranks cannot be split.
    cfg = sm.MoEConfig(dim=D, hidden_dim=16, num_experts=8, top_k=2)
    moe = sm.MoE(cfg, pctx, layout="replicated")
    moe.init_states(seed=0)
    return moe
