"""AllToAllDispatcher: the prefill path of TP2EP.

Each rank sends every sent row to the rank owning its expert (all_to_all), runs its
e = E/n local experts, and sends the results back (the mirror all_to_all). The split
sizes need one host sync (the count exchange). Received rows arrive source-major
(rank 0's rows for my experts, then rank 1's, ...) and are regrouped expert-major
for the grouped GEMM; combine undoes both steps.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from jaxtyping import Float, Int

from spmd_moe import collectives as C
from spmd_moe.checking import checked
from spmd_moe.dispatch.base import SentRows, count_per_expert, scatter_to_slots, sort_slots
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var, unchecked_cast


@dataclass(frozen=True)
class AllToAllState:
    num_tokens: int
    top_k: int
    sent_slots_S: Int[Placed[Var[EP]], " S"]  # slot index (into N) of each sent row, expert-sorted
    in_splits: list[int]  # rows sent to each rank
    out_splits: list[int]  # rows received from each rank
    regroup_R: Int[Placed[Var[EP]], " R"]  # source-major -> expert-major permutation


class AllToAllDispatcher:
    rows_exact = True

    def __init__(self, num_experts: int, pctx: ParallelContext[EP]):
        self.num_experts = num_experts
        self.pctx = pctx
        self.num_local = num_experts // pctx.size

    @checked(tokens=("x_TD",))
    def dispatch(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " e"], AllToAllState]:
        n, e = self.pctx.size, self.num_local
        T, K = expert_ids_TK.shape
        order_N, num_sent = sort_slots(expert_ids_TK, num_pad_tokens)
        sent_slots_S = order_N[:num_sent]
        # counts_ne[j] = my rows for rank j's experts; recv_ne[j] = rank j's rows for mine.
        counts_ne = count_per_expert(expert_ids_TK, self.num_experts).view(n, e)
        recv_ne = C.all_to_all(counts_ne, self.pctx, [1] * n, [1] * n)
        in_splits = counts_ne.sum(dim=1).tolist()  # host sync (prefill only)
        out_splits = recv_ne.sum(dim=1).tolist()
        recv_RD = C.all_to_all(x_TD[sent_slots_S // K], self.pctx, in_splits, out_splits)
        # Regroup source-major -> expert-major (stable: source order kept per expert).
        row_expert_R = torch.repeat_interleave(
            torch.arange(e, device=x_TD.device).repeat(n), recv_ne.reshape(-1),
            output_size=recv_RD.shape[0],
        )
        regroup_R = unchecked_cast(
            Placed[Var[EP]], torch.argsort(row_expert_R, stable=True),
            reason="a permutation of the rows this rank received",
        )
        state = AllToAllState(T, K, sent_slots_S, in_splits, out_splits, regroup_R)
        return recv_RD[regroup_R], recv_ne.sum(dim=0), state

    @checked
    def returned_rows(self, out_RD: Float[Placed[Var[EP]], "R D"], state: AllToAllState) -> SentRows:
        """The expert outputs back on their source rank, in sent order."""
        source_major_RD = unchecked_cast(
            Placed[Var[EP]], torch.empty_like(out_RD).index_copy_(0, state.regroup_R, out_RD),
            reason="this rank's expert outputs, reordered within the rank",
        )
        back_SD = C.all_to_all(source_major_RD, self.pctx, state.out_splits, state.in_splits)
        return SentRows(back_SD, state.sent_slots_S)

    @checked
    def combine(self, out_RD: Float[Placed[Var[EP]], "R D"], state: AllToAllState) -> Float[Placed[Var[EP]], "T K D"]:
        back = self.returned_rows(out_RD, state)
        slots_ND = scatter_to_slots(back.rows_SD, back.slots_S, state.num_tokens * state.top_k)
        return slots_ND.view(state.num_tokens, state.top_k, slots_ND.shape[-1])
