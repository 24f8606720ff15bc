"""README's usage example, checked by mypy with the plugin (assert_type on the result)."""

from typing import assert_type

import torch

import spmd_moe as sm
from spmd_moe.placement import EP, Placed, Rep, as_rep

cfg = sm.MoEConfig(dim=64, hidden_dim=32, num_experts=8, top_k=2, route_norm=True, padding="pad")
moe = sm.MoE(cfg)
moe.init_states(seed=0)
x_TD = as_rep(torch.randn(10, 64), moe.pctx, "x_TD")
with sm.debug():
    y_TD = moe(x_TD)
assert_type(y_TD, Placed[Rep[EP]])
