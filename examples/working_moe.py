"""A sequence-parallel MoE block that `spmd-moe check` passes (docs/check.md).

    spmd-moe check examples/working_moe.py:build

Each rank of the expert axis holds its own slice of the tokens (layout 'sequence'):
RMS norm, the MoE layer, a residual; plus a load-imbalance figure computed from the
*global* expert counts (``moe.global_tokens_per_expert()`` sums the per-rank counters
over the axis: Partial -> Replicate). examples/broken_moe.py is the same block with
the two bugs `spmd-moe check` finds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import spmd_moe as sm
from spmd_moe.apps.check import CheckTarget
from spmd_moe.placement import EP, Placed, Rep, Var, as_rep

D = 32


class SequenceParallelBlock(nn.Module):
    def __init__(self, pctx: sm.ParallelContext[EP]) -> None:
        super().__init__()
        cfg = sm.MoEConfig(dim=D, hidden_dim=16, num_experts=8, top_k=2, padding="pad", shared_hidden_dim=16)
        self.pctx = pctx
        self.moe = sm.MoE(cfg, pctx, layout="sequence")
        self.moe.init_states(seed=0)  # layout-independent seeded init: the same gate on every rank
        self.norm_w_D = nn.Parameter(torch.ones(D))

    def forward(self, x_TD: Placed[Var[EP]]) -> tuple[Placed[Var[EP]], Placed[Rep[EP]]]:
        w_D = as_rep(self.norm_w_D, self.pctx, "norm_w_D")
        h_TD = F.rms_norm(x_TD, (D,), w_D)
        y_TD = x_TD + self.moe(h_TD)
        counts_E = self.moe.global_tokens_per_expert()  # all ranks' counts: Replicate
        imbalance = counts_E.max() / counts_E.mean().clamp(min=1.0)
        return y_TD, imbalance


def build(pctx: sm.ParallelContext[EP]) -> CheckTarget:
    return CheckTarget(SequenceParallelBlock(pctx), layout="sequence", dim=D)
