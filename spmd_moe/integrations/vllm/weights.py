"""HF MoE checkpoint names -> spmd_moe MoE parameters (no vLLM import).

Per MoE layer prefix ``P`` (``model.layers.3.mlp``; Mixtral ``model.layers.3.block_sparse_moe``),
two spellings of the routed experts are accepted:

* per expert (transformers <= 4.x and what transformers 5.x ``save_pretrained`` writes):
  ``P.experts.{e}.gate_proj.weight`` [F, D], ``...up_proj.weight`` [F, D],
  ``...down_proj.weight`` [D, F] (Mixtral: ``w1`` gate, ``w3`` up, ``w2`` down);
* fused (transformers-v5 in-memory names): ``P.experts.gate_up_proj`` [E, 2F, D]
  (gate rows first, then up), ``P.experts.down_proj`` [E, D, F].

The router is ``P.gate.weight`` [E, D]. A rank keeps only experts [e0, e1). Qwen2-MoE's
shared expert ``P.shared_expert.{gate,up,down}_proj.weight`` is split over the TP ranks
(hidden dim), its gate ``P.shared_expert_gate.weight`` [1, D] is replicated.

Every rank reads every tensor name (vLLM's loader iterates the whole checkpoint on each
rank), so :class:`ExpertLedger` checks duplicates and completeness over *all* experts,
not only this rank's: a checkpoint problem raises the same error on every rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from spmd_moe.errors import CheckpointError

W1, W2, W3 = "routed_experts.inner_experts.w1_EFD", "routed_experts.inner_experts.w2_EDF", "routed_experts.inner_experts.w3_EFD"
ROUTER = "router.gate.weight"

SHARED_W1, SHARED_W2, SHARED_W3, SHARED_GATE = (
    "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight", "shared_experts.gate.weight",
)

_BLOCK = r"(?P<mlp>.+\.(?:mlp|block_sparse_moe))"
_PER_EXPERT = re.compile(_BLOCK + r"\.experts\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED = re.compile(_BLOCK + r"\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER = re.compile(_BLOCK + r"\.gate\.weight$")
_SHARED = re.compile(r"^(?P<mlp>.+\.mlp)\.shared_expert\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$")
_SHARED_GATE = re.compile(r"^(?P<mlp>.+\.mlp)\.shared_expert_gate\.weight$")

_KIND_TO_PARAM = {"gate_proj": W1, "up_proj": W3, "down_proj": W2, "w1": W1, "w3": W3, "w2": W2}
_PARAM_TO_WHICH = {W1: "gate", W3: "up", W2: "down"}


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


def is_shared_weight(name: str) -> bool:
    return bool(_SHARED.match(name) or _SHARED_GATE.match(name))


def shared_copy(name: str, tensor: torch.Tensor, *, shared_hidden: int, dim: int, size: int, rank: int) -> tuple[str, torch.Tensor]:
    """(full parameter name, this rank's slice) for one shared-expert checkpoint tensor:
    gate/up rows and down columns split ``size`` ways (the hidden dim), the gate whole."""
    S, D = shared_hidden, dim
    m = _SHARED_GATE.match(name)
    if m:
        t = tensor.reshape(1, -1) if tensor.dim() == 1 else tensor  # GGUF stores it 1-D
        _check_shape(name, t, (1, D))
        return f"{m['mlp']}.{SHARED_GATE}", t
    m = _SHARED.match(name)
    if m is None:
        raise CheckpointError(
            f"checkpoint weight '{name}': expected a shared-expert name (mlp.shared_expert."
            "{gate,up,down}_proj.weight or mlp.shared_expert_gate.weight), got another. Fix: convert the names."
        )
    if m["kind"] == "down_proj":
        _check_shape(name, tensor, (D, S))
        return f"{m['mlp']}.{SHARED_W2}", tensor.chunk(size, dim=1)[rank]
    _check_shape(name, tensor, (S, D))
    param = SHARED_W1 if m["kind"] == "gate_proj" else SHARED_W3
    return f"{m['mlp']}.{param}", tensor.chunk(size, dim=0)[rank]


def moe_prefix_of(name: str) -> str | None:
    """The block prefix (``...mlp`` / ``...block_sparse_moe``) of a routed-expert,
    router or shared-expert weight name, else None."""
    for rx in (_PER_EXPERT, _FUSED, _ROUTER, _SHARED, _SHARED_GATE):
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
        want = (D, F) if _KIND_TO_PARAM[m["kind"]] == W2 else (F, D)
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
            "Fix: check hidden_size / moe_intermediate_size (Mixtral: intermediate_size) / "
            "shared_expert_intermediate_size / num_experts of the model config against the checkpoint (fused gate_up_proj is [E, 2F, D], gate rows first)."
        )


class ExpertLedger:
    """Which experts the checkpoint supplied (all of them, on every rank) and which
    (param, local expert) slots this rank filled: strict, no double loads.

    ``note`` runs on every rank for every routed-expert tensor, so a duplicate or a
    missing expert raises the same error on every rank, naming the checkpoint tensor."""

    def __init__(self) -> None:
        self._filled: dict[str, set[int]] = {}
        self._seen: dict[tuple[str, str], dict[int, str]] = {}  # (block, param) -> expert -> tensor name

    def note(self, name: str, num_experts: int) -> None:
        """Record the experts a routed-expert checkpoint tensor covers (every rank)."""
        cover: list[tuple[str, tuple[int, ...]]]
        m = _PER_EXPERT.match(name)
        if m:
            cover = [(_KIND_TO_PARAM[m["kind"]], (int(m["e"]),))]
        else:
            m = _FUSED.match(name)
            if m is None:
                return
            ids = tuple(range(num_experts))
            cover = [(W1, ids), (W3, ids)] if m["kind"] == "gate_up_proj" else [(W2, ids)]
        for param, ids in cover:
            seen = self._seen.setdefault((m["mlp"], param), {})
            again = sorted(e for e in ids if e in seen)
            if again:
                raise CheckpointError(
                    f"checkpoint weight '{name}': expert(s) {again} of '{m['mlp']}' ({_PARAM_TO_WHICH[param]} "
                    f"projection) were already loaded from '{seen[again[0]]}'. Expected each expert "
                    "once, got it twice (both the per-expert and the fused spelling?). Fix: keep one "
                    "spelling in the checkpoint."
                )
            for e in ids:
                seen[e] = name

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

    def check_all_experts(self, blocks: dict[str, int], expert_name: Any) -> None:
        """blocks: MoE block prefix -> num_experts. Raise (the same on every rank) unless
        the checkpoint held every expert's gate, up and down weight of every block.
        expert_name(block, expert, which) -> the checkpoint tensor name to report."""
        for block, E in sorted(blocks.items()):
            for param in (W1, W3, W2):
                which = _PARAM_TO_WHICH[param]
                missing = sorted(set(range(E)) - set(self._seen.get((block, param), {})))
                if missing:
                    names = [expert_name(block, e, which) for e in missing[:4]]
                    raise CheckpointError(
                        f"checkpoint weight{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(n) for n in names)}{' ...' if len(missing) > 4 else ''}: "
                        f"expected in the checkpoint (layer '{block}', num_experts={E}), got none "
                        f"for expert(s) {missing}. Fix: the checkpoint lacks them; check "
                        "num_experts of the config and the expert weight names (per expert "
                        "experts.{e}.<gate|up|down>.weight, or fused experts.gate_up_proj/down_proj)."
                    )

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
