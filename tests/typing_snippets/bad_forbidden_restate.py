"""FORBIDDEN['restate']: stating a placement on an axis where the tensor already has one."""

import torch

from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import DP, EP, Placed, Rep, Var, as_inv, as_par, as_rep, as_var


def restated(v: Placed[Var[EP]], r: Placed[Rep[EP], Var[DP]], ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
    as_rep(v, ep)  # E: as_rep: the tensor is already Varying on axis EP
    as_par(v, ep)  # E: as_par: the tensor is already Varying on axis EP
    as_inv(r, ep)  # E: as_inv: the tensor is already Replicate on axis EP
    as_var(r, dp)  # E: as_var: the tensor is already Varying on axis DP


def stating_a_new_axis_is_fine(v: Placed[Var[EP]], t: torch.Tensor, ep: ParallelContext[EP], dp: ParallelContext[DP]) -> None:
    as_rep(v, dp)
    as_var(t, ep)
