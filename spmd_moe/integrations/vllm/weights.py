"""HF Qwen3-MoE checkpoint names -> spmd_moe MoE parameters (no vLLM import).

Two spellings of the routed experts are accepted, per layer prefix ``P`` (for example
``model.layers.3``):

* per expert (transformers <= 4.x and what transformers 5.x ``save_pretrained`` writes):
  ``P.mlp.experts.{e}.gate_proj.weight`` [F, D], ``...up_proj.weight`` [F, D],
  ``...down_proj.weight`` [D, F];
* fused (transformers-v5 in-memory names): ``P.mlp.experts.gate_up_proj`` [E, 2F, D]
  (gate rows first, then up), ``P.mlp.experts.down_proj`` [E, D, F].

The router is ``P.mlp.gate.weight`` [E, D]. A rank keeps only experts [e0, e1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from spmd_moe.errors import CheckpointError

W1, W2, W3 = "routed_experts.inner_experts.w1_EFD", "routed_experts.inner_experts.w2_EDF", "routed_experts.inner_experts.w3_EFD"
ROUTER = "router.gate.weight"

_PER_EXPERT = re.compile(r"^(?P<mlp>.+\.mlp)\.experts\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<mlp>.+\.mlp)\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<mlp>.+\.mlp)\.gate\.weight$")

_KIND_TO_PARAM = {"gate_proj": W1, "up_proj": W3, "down_proj": W2}


@dataclass(frozen=True)
class ExpertCopy:
    """Copy ``src`` into ``param[local_start : local_start + src.shape[0]]``."""

    param: str  # full parameter name in the model
    local_start: int
    experts: tuple[int, ...]  # global expert ids covered
    src: torch.Tensor  # [n_experts, ...]


def is_expert_weight(name: str) -> bool:
    return bool(_PER_EXPERT.match(name) or _FUSED.match(name))


def router_param(name: str) -> str | None:
    m = _ROUTER.match(name)
    return f"{m['mlp']}.{ROUTER}" if m else None


def moe_prefix_of(name: str) -> str | None:
    """The ``...mlp`` prefix of a routed-expert or router weight name, else None."""
    for rx in (_PER_EXPERT, _FUSED, _ROUTER):
        m = rx.match(name)
        if m:
            return m["mlp"]
    return None


def expert_copies(
    name: str, tensor: torch.Tensor, *, num_experts: int, hidden_dim: int, dim: int, e0: int, e1: int
) -> list[ExpertCopy]:
    """The copies this rank makes for one checkpoint tensor (empty: not its experts).

    Raises CheckpointError for a shape or expert id that does not fit the layer.
    """
    F, D, E = hidden_dim, dim, num_experts
    m = _PER_EXPERT.match(name)
    if m:
        e = int(m["e"])
        want = (D, F) if m["kind"] == "down_proj" else (F, D)
        if e >= E:
            raise CheckpointError(
                f"checkpoint weight '{name}': expected an expert id < num_experts={E}, got {e}. "
                "Fix: check num_experts of the model config against the checkpoint."
            )
        _check_shape(name, tensor, want)
        if not e0 <= e < e1:
            return []
        return [ExpertCopy(f"{m['mlp']}.{_KIND_TO_PARAM[m['kind']]}", e - e0, (e,), tensor.unsqueeze(0))]
    m = _FUSED.match(name)
    if m:
        if m["kind"] == "gate_up_proj":
            _check_shape(name, tensor, (E, 2 * F, D))
            local = tensor[e0:e1]
            ids = tuple(range(e0, e1))
            return [
                ExpertCopy(f"{m['mlp']}.{W1}", 0, ids, local[:, :F]),
                ExpertCopy(f"{m['mlp']}.{W3}", 0, ids, local[:, F:]),
            ]
        _check_shape(name, tensor, (E, D, F))
        return [ExpertCopy(f"{m['mlp']}.{W2}", 0, tuple(range(e0, e1)), tensor[e0:e1])]
    raise CheckpointError(
        f"checkpoint weight '{name}': expected a routed-expert name "
        "(mlp.experts.{e}.gate_proj/up_proj/down_proj.weight or mlp.experts.gate_up_proj/"
        "down_proj), got another. Fix: convert the checkpoint's expert names."
    )


def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise CheckpointError(
            f"checkpoint weight '{name}': expected shape {want}, got {tuple(t.shape)}. "
            "Fix: check hidden_size / moe_intermediate_size / num_experts of the model "
            "config against the checkpoint (fused gate_up_proj is [E, 2F, D], gate rows first)."
        )


class ExpertLedger:
    """Which (param, local expert) slots were filled: strict, no double loads."""

    def __init__(self) -> None:
        self._filled: dict[str, set[int]] = {}

    def add(self, c: ExpertCopy, source: str) -> None:
        got = self._filled.setdefault(c.param, set())
        again = got.intersection(c.experts)
        if again:
            raise CheckpointError(
                f"checkpoint weight '{source}': expert(s) {sorted(again)} of '{c.param}' were "
                "already loaded. Expected each expert once, got it twice (both the per-expert "
                "and the fused spelling?). Fix: keep one spelling in the checkpoint."
            )
        got.update(c.experts)

    def complete(self, params: dict[str, tuple[int, int]]) -> set[str]:
        """params: name -> (e0, e1) of this rank. Raise unless every slot was filled."""
        done: set[str] = set()
        for p, (e0, e1) in sorted(params.items()):
            missing = sorted(set(range(e0, e1)) - self._filled.get(p, set()))
            if missing:
                raise CheckpointError(
                    f"parameter '{p}': expected weights for this rank's experts [{e0}, {e1}), "
                    f"got none for expert(s) {missing}. Fix: the checkpoint lacks them; check "
                    "num_experts and the expert weight names (mlp.experts.{e}.*_proj.weight "
                    "or mlp.experts.gate_up_proj/down_proj)."
                )
            done.add(p)
        return done
