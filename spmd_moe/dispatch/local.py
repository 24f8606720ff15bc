"""LocalDispatcher: expert-sorted permutation of this rank's slots, no communication
(EP size 1: every expert is local). Shape suffixes as in spmd_moe.dispatch.base."""

from __future__ import annotations

from dataclasses import dataclass
from jaxtyping import Float, Int

from spmd_moe.checking import checked
from spmd_moe.dispatch.base import ExpertsFn, SentRows, count_ids, count_per_expert, scatter_to_slots, sort_slots
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var

__all__ = ["LocalDispatcher", "LocalState", "count_ids", "count_per_expert", "scatter_to_slots", "sort_slots"]


@dataclass(frozen=True)
class LocalState:
    num_tokens: int
    top_k: int
    sent_slots_R: Int[Placed[Var[EP]], " R"]  # slot index (into N) of each sent row, expert-sorted


class LocalDispatcher:
    """EP size 1: every expert is local."""

    rows_exact = True

    def __init__(self, num_experts: int, pctx: ParallelContext[EP]):
        self.num_experts = num_experts
        self.pctx = pctx

    @checked
    def dispatch(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " E"], LocalState]:
        sent_slots_R, counts_E, state = self.sorted_slots(expert_ids_TK, num_pad_tokens)
        # int32 token index: indexing keeps its index for backward (half of int64's bytes).
        return x_TD[(sent_slots_R // state.top_k).int()], counts_E, state

    @checked
    def sorted_slots(
        self, expert_ids_TK: Int[Placed[Var[EP]], "T K"], num_pad_tokens: int
    ) -> tuple[Int[Placed[Var[EP]], " R"], Int[Placed[Var[EP]], " E"], LocalState]:
        """dispatch without the gather: the expert-sorted slots (token t*K + k) and the
        rows per expert, for experts that read x through the slots themselves
        (spmd_moe.kernels.gather_gemm)."""
        T, K = expert_ids_TK.shape
        order_N, num_sent = sort_slots(expert_ids_TK, num_pad_tokens, self.num_experts)
        sent_slots_R = order_N[:num_sent]
        counts_E = count_per_expert(expert_ids_TK, self.num_experts)
        return sent_slots_R, counts_E, LocalState(T, K, sent_slots_R)

    @checked
    def combine(self, out_RD: Float[Placed[Var[EP]], "R D"], state: LocalState) -> Float[Placed[Var[EP]], "T K D"]:
        slots_ND = scatter_to_slots(out_RD, state.sent_slots_R, state.num_tokens * state.top_k)
        return slots_ND.view(state.num_tokens, state.top_k, slots_ND.shape[-1])

    def returned_rows(self, out_RD: Float[Placed[Var[EP]], "R D"], state: LocalState) -> SentRows:
        return SentRows(out_RD, state.sent_slots_R)

    def weighted(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        weights_TK: Float[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
        experts: ExpertsFn,
    ) -> None:
        """No partial-sum form: the caller weights the rows."""
        return None

    def pipelined(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
        experts: ExpertsFn,
    ) -> None:
        """No interleaved form: the caller runs dispatch -> experts -> combine."""
        return None
