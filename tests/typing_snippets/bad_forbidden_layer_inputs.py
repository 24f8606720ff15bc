"""The `forbidden` input pairs of the layer-op rules in typing_rules.rules (gate_matmul,
score_topk, token_count, swiglu), written with the library's own functions and modules.
Runtime counterpart: tests/test_rules_runtime.py::test_layer_rule_forbidden_inputs_raise."""

import torch.nn.functional as F

from spmd_moe import collectives as C
from spmd_moe.dispatch.base import count_per_expert
from spmd_moe.experts import GroupedExperts
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Par, Placed, Rep, Var
from spmd_moe.router import TopKRouter


def gate_matmul_x_replicate(router: TopKRouter, x_TD: Placed[Rep[EP]]) -> None:
    router(x_TD)  # E: expected "Placed[Var[EP]]"


def gate_matmul_x_partial(router: TopKRouter, x_TD: Placed[Par[EP]]) -> None:
    router(x_TD)  # E: expected "Placed[Var[EP]]"


def score_topk_logits_partial(logits_TE: Placed[Par[EP]]) -> None:
    F.softmax(logits_TE, dim=-1)  # E: placement rule 'partial_nonlinear' on axis 'EP'


def token_count_of_replicate_ids(ids_TK: Placed[Rep[EP]], ep: ParallelContext[EP]) -> None:
    count_per_expert(ids_TK, 4)  # E: expected "Placed[Var[EP]]"
    C.partial_from_shards(ids_TK, ep)  # E: partial_from_shards(x) on axis EP: expected Varying (V), got Replicate on EP


def swiglu_gate_partial(experts: GroupedExperts, rows_RD: Placed[Par[EP]], counts_e: Placed[Var[EP]], gate_RF: Placed[Par[EP]]) -> None:
    experts(rows_RD, counts_e)  # E: expected "Placed[Var[EP]]"
    F.silu(gate_RF)  # E: placement rule 'partial_nonlinear' on axis 'EP'
