"""The placement rule of every op an spmd_moe layer performs, as data.

Placements are spmd_types' letters on the layer's expert axis:

* ``R`` Replicate: the same value on every rank (its gradient is Partial),
* ``I`` Invariant: the same value on every rank (its gradient is Invariant too),
* ``V`` Varying: each rank holds different data (its token slice, its experts),
* ``P`` Partial: the true value is the sum over ranks.

A rule says which placement each input must have, what the output has, which input
placements are errors in this layer (``forbidden``) and why. The runtime checker
(``spmd_moe.placement`` / ``spmd_moe.collectives``) reads its expectations and its
"Fix:" hints from here; ``tests/test_typing_rules.py`` computes each rule numerically
on a real 2-rank run. This package imports nothing from spmd_moe (spmd_moe imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["R", "I", "V", "P"]

PLACEMENT_NAMES: dict[str, str] = {"R": "Replicate", "I": "Invariant", "V": "Varying", "P": "Partial"}


@dataclass(frozen=True)
class OpRule:
    """``inputs``: (argument, placement) pairs; ``forbidden``: (argument, placement)
    pairs the layer rejects; ``call``: how the op is written in spmd_moe (for fixes)."""

    name: str
    inputs: tuple[tuple[str, Placement], ...]
    output: Placement
    forbidden: tuple[tuple[str, Placement], ...]
    why: str
    collective: bool = False
    call: str = ""
    suggest: bool = True  # offered as a "Fix:" for a placement mismatch

    def input(self, arg: str) -> Placement:
        for a, p in self.inputs:
            if a == arg:
                return p
        raise KeyError(f"rule '{self.name}' has no input '{arg}' (inputs: {[a for a, _ in self.inputs]})")

    @property
    def signature(self) -> str:
        ins = ", ".join(f"{a}: {p}" for a, p in self.inputs)
        return f"{self.name}({ins}) -> {self.output}"


_NONLINEAR = (
    "non-linear: f(sum over ranks of partials) != sum over ranks of f(partials); "
    "a Partial input must be summed (all_reduce / reduce_scatter) first"
)

_RULES: tuple[OpRule, ...] = (
    # ---------------------------------------------------------------- local ops
    OpRule(
        "gate_matmul", (("x_TD", "V"), ("gate_weight_ED", "R")), "V", (("x_TD", "R"), ("x_TD", "P")),
        "row-wise: each rank's logits are the rows of the full x @ W.T for its own tokens. "
        "A Replicate x would make every rank route every token (counted n times); a "
        "Partial x feeds a non-linear score function next",
    ),
    OpRule(
        "score_topk", (("logits_TE", "V"),), "V", (("logits_TE", "P"),),
        "softmax/sigmoid and top-k act per token row, so a token slice maps to a token "
        "slice; " + _NONLINEAR,
    ),
    OpRule(
        "token_count", (("expert_ids_TK", "V"),), "P", (("expert_ids_TK", "R"),),
        "bincount of this rank's slice is one summand of the global count (sum over "
        "ranks = bincount of all tokens); counting a Replicate tensor on every rank "
        "would count each token n times",
    ),
    OpRule(
        "permute", (("x_TD", "V"), ("index_N", "V")), "V", (),
        "gathering rows of this rank's slice by this rank's indices moves rows within "
        "the rank: the global result is the block-diagonal permutation",
    ),
    OpRule(
        "grouped_gemm", (("routed_RD", "V"), ("w_eFD", "V")), "V", (),
        "each rank multiplies the rows routed to it by its own experts' weights (experts "
        "sharded E/n per rank): the rows of the full per-expert product that it owns",
    ),
    OpRule(
        "swiglu", (("gate_RF", "V"), ("up_RF", "V")), "V", (("gate_RF", "P"),),
        "silu(gate) * up per element; " + _NONLINEAR,
    ),
    OpRule(
        "weighted_combine", (("slots_TKD", "V"), ("weights_TK", "V")), "V", (),
        "sum over k of w[t,k] * slot[t,k] is per token: a token slice maps to a token slice",
    ),
    OpRule(
        "column_parallel", (("x_TD", "R"), ("w_fD", "V")), "V", (),
        "shared expert w1/w3 with the hidden dim sharded: each rank computes its own "
        "columns of the full product from the replicated input",
    ),
    OpRule(
        "row_parallel", (("h_Tf", "V"), ("w_Df", "V")), "P", (),
        "shared expert w2 with the hidden dim sharded: each rank's product of its hidden "
        "shard is one summand of the full product (V -> P reinterpret, no communication)",
        call="spmd_moe.collectives.partial_from_shards(x, pctx)",
    ),
    OpRule(
        "rank_view", (("x", "R"),), "V", (),
        "no communication: every rank holds the same value and then uses it differently "
        "(the decode dispatcher keeps the gathered rows of its own experts); backward "
        "the per-rank gradients are summands (V -> P)",
        call="spmd_moe.collectives.rank_view(x, pctx)", suggest=False,
    ),
    # ---------------------------------------------------------------- collectives
    OpRule(
        "split_tokens", (("x_TD", "R"),), "V", (("x_TD", "V"),),
        "keep this rank's contiguous chunk of dim 0; splitting an already split slice "
        "would drop tokens",
        collective=True, call="spmd_moe.collectives.split_tokens(x, pctx)",
    ),
    OpRule(
        "all_gather", (("x_TD", "V"),), "R", (("x_TD", "R"),),
        "concatenate every rank's chunk along dim 0; gathering a Replicate tensor "
        "repeats it n times",
        collective=True, call="spmd_moe.collectives.all_gather(x, pctx)",
    ),
    OpRule(
        "reduce_scatter", (("x_TD", "P"),), "V", (("x_TD", "R"),),
        "sum over ranks, keep this rank's chunk of dim 0; summing a Replicate tensor "
        "multiplies it by n",
        collective=True, call="spmd_moe.collectives.reduce_scatter(x, pctx)",
    ),
    OpRule(
        "all_reduce", (("x", "P"),), "R", (("x", "R"),),
        "sum over ranks; summing a Replicate tensor multiplies it by n",
        collective=True, call="spmd_moe.collectives.all_reduce(x, pctx)",
    ),
    OpRule(
        "all_to_all", (("x_ND", "V"),), "V", (),
        "rank i's block j goes to rank j's block i: rows move between ranks, each rank "
        "still holds different rows",
        collective=True, call="spmd_moe.collectives.all_to_all(x, pctx, in_splits, out_splits)",
    ),
)

_RULES += (
    OpRule(
        "invariant_to_replicate", (("x", "I"),), "R", (),
        "no communication forward; backward sums the Partial gradient over the axis (P -> I): "
        "a replicated-activation (Megatron-style) model entering the layer",
        collective=True, call="spmd_moe.collectives.invariant_to_replicate(x, pctx)",
    ),
    OpRule(
        "replicate_to_invariant", (("x", "R"),), "I", (),
        "no communication forward; backward turns every rank's complete gradient into "
        "Partial summands (I -> P): the layer's exit into a replicated-activation model",
        collective=True, call="spmd_moe.collectives.replicate_to_invariant(x, pctx)",
    ),
)

RULES: dict[str, OpRule] = {r.name: r for r in _RULES}
# spmd_moe.collectives function name -> its rule (read by the mypy plugin and at runtime).
COLLECTIVE_FUNCS: dict[str, OpRule] = {
    r.call.removeprefix("spmd_moe.collectives.").split("(")[0]: r
    for r in _RULES if r.call.startswith("spmd_moe.collectives.")
}


def rule(name: str) -> OpRule:
    try:
        return RULES[name]
    except KeyError:
        raise KeyError(f"no placement rule named '{name}' (known: {sorted(RULES)})") from None


def input_placement(op: str, arg: str | None = None) -> Placement:
    """The placement op ``op`` requires of ``arg`` (default: its first input)."""
    r = rule(op)
    return r.inputs[0][1] if arg is None else r.input(arg)


def converting_collectives(src: str, dst: str) -> list[OpRule]:
    """The collectives (or reinterprets) that turn ``src`` into ``dst``."""
    return [r for r in _RULES if r.suggest and r.call and r.inputs[0][1] == src and r.output == dst]


def fix(expected: str, actual: str) -> str | None:
    """A "Fix:" hint turning ``actual`` into ``expected``, or None if no single op does."""
    ops = converting_collectives(actual, expected)
    if not ops:
        return None
    return " or ".join(f"call {r.call} first ({r.name}: {actual} -> {expected})" for r in ops)
