"""The Dispatcher protocol and the slot helpers every dispatcher shares.

Shape suffixes: T tokens on this rank, K top-k, N = T*K slots (slot t*K+k is token t's
k-th choice), R rows this rank's experts receive, S rows this rank sent, D model dim,
E experts, e local experts. Pad tokens carry expert id E (one past the last): they sort
last and are never sent. Everything here is Varying on the expert axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, TypeVar

import torch
from jaxtyping import Float, Int

from spmd_moe.placement import EP, Placed, Var, unchecked_cast

S = TypeVar("S")

# The expert GEMMs as a dispatcher's pipelined form calls them:
# experts(routed_RD, counts_e, rows_exact) -> out_RD.
ExpertsFn = Callable[[Placed[Var[EP]], Placed[Var[EP]], bool], Placed[Var[EP]]]


class SentRows(NamedTuple):
    """The expert outputs back on the rank that sent them, in sent order, and the slot
    (index into N) each belongs to: what the fused CUDA combine reads."""

    rows_SD: Float[Placed[Var[EP]], "S D"]
    slots_S: Int[Placed[Var[EP]], " S"]


class Dispatcher(Protocol[S]):
    """Moves this rank's routed rows to the rank and slot order of their experts and
    back. ``S`` is the dispatcher's own state (what combine needs to undo dispatch).

    Dispatchers only move rows: weighting by the gate values and the sum over k happen
    once, in MoE, in a fixed order, whichever dispatcher ran.
    """

    # dispatch returns exactly sum(counts_e) rows: the expert GEMMs need no zeroed tail.
    rows_exact: bool

    def dispatch(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " e"], S]:
        """(rows grouped by local expert, rows per local expert, state)."""
        ...

    def combine(self, out_RD: Float[Placed[Var[EP]], "R D"], state: S) -> Float[Placed[Var[EP]], "T K D"]:
        """Each expert output back in its token's slot (unsent slots: zeros)."""
        ...

    def returned_rows(self, out_RD: Float[Placed[Var[EP]], "R D"], state: S) -> SentRows | None:
        """The fused-combine hook: the outputs back in sent order, or None where the
        dispatcher has no such form (its combine sums over ranks)."""
        ...

    def weighted(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        weights_TK: Float[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
        experts: ExpertsFn,
    ) -> Float[Placed[Var[EP]], "T D"] | None:
        """The routed output of this rank's tokens with the weighting done on the expert
        ranks (fp32 partial sums travel back), or None where the dispatcher does not
        (the caller runs the row path and weights in MoE)."""
        ...

    def pipelined(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
        experts: ExpertsFn,
    ) -> SentRows | None:
        """Dispatch, ``experts`` and the way back interleaved (exchanges overlapping the
        GEMMs), or None where the dispatcher does not (the caller then runs dispatch ->
        experts -> returned_rows/combine)."""
        ...


def sort_slots(expert_ids_TK: Placed[Var[EP]], num_pad_tokens: int, num_experts: int) -> tuple[Placed[Var[EP]], int]:
    """Slots in expert order (stable: token order within an expert) and how many to send."""
    T, K = expert_ids_TK.shape
    # A stable sort gives the same order on any key dtype that holds every id (experts
    # and the pad id E); CUDA's radix sort makes one pass per key byte (H200, T*K =
    # 262144: int64 keys 0.144 ms, int16 0.074 ms, docs/prefill_fwd_h200.json).
    key_dt = torch.int16 if num_experts < 2**15 - 1 else torch.int32
    order_N = torch.argsort(expert_ids_TK.reshape(-1).to(key_dt), stable=True)
    return order_N, (T - num_pad_tokens) * K


def count_ids(ids: Int[Placed[Var[EP]], "..."], num_bins: int) -> Int[Placed[Var[EP]], " B"]:
    """int64 histogram of this rank's ids in [0, num_bins), with no host sync
    (torch.bincount reads the max back to the host on CUDA, which stalls the launch
    queue and CUDA graphs)."""
    flat = ids.reshape(-1)
    counts_B = torch.zeros(num_bins, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return unchecked_cast(Placed[Var[EP]], counts_B, reason="a histogram of this rank's ids")


def count_per_expert(expert_ids_TK: Int[Placed[Var[EP]], "T K"], num_experts: int) -> Int[Placed[Var[EP]], " E"]:
    """Tokens per expert over this rank's slots, pads (id E) dropped. int64 [E]."""
    return count_ids(expert_ids_TK, num_experts + 1)[:num_experts]


def scatter_to_slots(
    rows_SD: Float[Placed[Var[EP]], "S D"], sent_slots_S: Int[Placed[Var[EP]], " S"], num_slots: int
) -> Float[Placed[Var[EP]], "N D"]:
    """Put each returned row back in its slot; unsent slots (pads) get zeros."""
    if rows_SD.shape[0] == num_slots:  # every slot sent: sent_slots_S is a permutation
        slots_ND = rows_SD.new_empty(num_slots, rows_SD.shape[-1])
    else:
        slots_ND = rows_SD.new_zeros(num_slots, rows_SD.shape[-1])
    slots_ND.index_copy_(0, sent_slots_S, rows_SD)  # in place: no copy of the buffer
    return unchecked_cast(Placed[Var[EP]], slots_ND, reason="this rank's rows, moved within the rank")
