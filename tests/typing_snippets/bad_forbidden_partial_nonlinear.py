"""FORBIDDEN['partial_nonlinear']: a Partial tensor into a non-linear op (typing_rules.ops).
Runtime counterpart: tests/test_rules_runtime.py::test_forbidden_raises_at_runtime[partial_nonlinear]."""

import torch
import torch.nn.functional as F

from spmd_moe.placement import DP, EP, Par, Placed, Rep


def scores_of_partial_logits(logits_TE: Placed[Par[EP]]) -> None:
    F.softmax(logits_TE, dim=-1)  # E: placement rule 'partial_nonlinear' on axis 'EP'
    torch.sigmoid(logits_TE)  # E: placement rule 'partial_nonlinear' on axis 'EP'
    logits_TE.topk(2, dim=-1)  # E: placement rule 'partial_nonlinear' on axis 'EP'


def swiglu_of_a_partial_gate(gate_RF: Placed[Par[EP]], up_RF: Placed[Rep[EP]]) -> None:
    F.silu(gate_RF) * up_RF  # E: placement rule 'partial_nonlinear' on axis 'EP'


def partial_on_the_other_axis(x: Placed[Rep[EP], Par[DP]]) -> None:
    x.exp()  # E: placement rule 'partial_nonlinear' on axis 'DP'
