"""Each layout's typed call: mypy infers the output placement of ``moe(x)`` from the
layout the layer was built with (assert_type fails if a signature says otherwise)."""

from typing import assert_type

import torch

import spmd_moe as sm
from spmd_moe.moe import MoE, Invariant, Replicated, Sequence
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Inv, Placed, Rep, Var, as_inv, as_rep, as_var


def each_layout(cfg: sm.MoEConfig, ep: ParallelContext[EP], x: torch.Tensor) -> None:
    rep = sm.MoE(cfg, ep, layout="replicated")
    inv = sm.MoE(cfg, ep, layout="invariant")
    seq = sm.MoE(cfg, ep, layout="sequence")
    assert_type(rep, MoE[Replicated])
    assert_type(inv, MoE[Invariant])
    assert_type(seq, MoE[Sequence])
    assert_type(rep(as_rep(x, ep, "x")), Placed[Rep[EP]])
    assert_type(inv(as_inv(x, ep, "x")), Placed[Inv[EP]])
    assert_type(seq(as_var(x, ep, "x")), Placed[Var[EP]])
    assert_type(rep.global_tokens_per_expert(), Placed[Rep[EP]])


def with_a_data_axis(seq: MoE[Sequence], inv: MoE[Invariant], x_TD: Placed[Var[EP], Rep[DP]], i_TD: Placed[Inv[EP], Var[DP]]) -> None:
    assert_type(seq(x_TD), Placed[Var[EP], Rep[DP]])
    assert_type(inv(i_TD), Placed[Inv[EP], Var[DP]])


def router_and_experts(moe: MoE[Sequence], x_TD: Placed[Var[EP]]) -> None:
    weights_TK, expert_ids_TK, scores_TE = moe.router(x_TD, None)
    assert_type(expert_ids_TK, Placed[Var[EP]])
    assert_type(moe.router.gate_weight(), Placed[Rep[EP]])
