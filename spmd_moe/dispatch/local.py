"""LocalDispatcher: expert-sorted permutation of this rank's slots, no communication.

Shape suffixes: T tokens on this rank, K top-k, N = T*K slots, R rows sent to
experts (N minus pad slots), D model dim, E experts, e local experts.
Pad tokens carry expert id E (one past the last): they sort last and are never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int

from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var, as_var
from spmd_moe.checking import checked


@dataclass
class DispatchState:
    """What combine needs to undo dispatch."""

    num_tokens: int
    top_k: int
    sent_slots_R: torch.Tensor  # slot index (into N) of each sent row, expert-sorted
    extra: dict[str, object] = field(default_factory=dict)


def sort_slots(expert_ids_TK: torch.Tensor, num_pad_tokens: int) -> tuple[torch.Tensor, int]:
    """Slots in expert order (stable: token order within an expert) and how many to send."""
    T, K = expert_ids_TK.shape
    order_N = torch.argsort(expert_ids_TK.reshape(-1), stable=True)
    return order_N, (T - num_pad_tokens) * K


def count_ids(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """int64 histogram of ids in [0, num_bins), with no host sync (torch.bincount reads
    the max back to the host on CUDA, which stalls the launch queue and CUDA graphs)."""
    flat = ids.reshape(-1)
    return torch.zeros(num_bins, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def count_per_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert over this rank's slots, pads (id E) dropped. int64 [E]."""
    return count_ids(expert_ids_TK, num_experts + 1)[:num_experts]


def scatter_to_slots(rows_RD: torch.Tensor, sent_slots_R: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Put each returned row back in its slot; unsent slots (pads) get zeros."""
    if rows_RD.shape[0] == num_slots:  # every slot sent: sent_slots_R is a permutation
        slots_ND = rows_RD.new_empty(num_slots, rows_RD.shape[-1])
    else:
        slots_ND = rows_RD.new_zeros(num_slots, rows_RD.shape[-1])
    return slots_ND.index_copy_(0, sent_slots_R, rows_RD)  # in place: no copy of the buffer


class LocalDispatcher:
    """EP size 1: every expert is local."""

    def __init__(self, num_experts: int, pctx: ParallelContext):
        self.num_experts = num_experts
        self.pctx = pctx

    @checked
    def dispatch(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " E"], DispatchState]:
        T, K = expert_ids_TK.shape
        order_N, num_sent = sort_slots(expert_ids_TK, num_pad_tokens)
        sent_slots_R = order_N[:num_sent]
        routed_RD = x_TD[sent_slots_R // K]
        counts_E = count_per_expert(expert_ids_TK, self.num_experts)
        return as_var(routed_RD), as_var(counts_E), DispatchState(T, K, sent_slots_R)

    @checked
    def combine(self, out_RD: Float[Placed[Var[EP]], "R D"], state: DispatchState) -> Float[Placed[Var[EP]], "T K D"]:
        slots_ND = scatter_to_slots(out_RD, state.sent_slots_R, state.num_tokens * state.top_k)
        return as_var(slots_ND.view(state.num_tokens, state.top_k, slots_ND.shape[-1]))
