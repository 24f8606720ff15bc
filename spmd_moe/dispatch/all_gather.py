"""AllGatherDispatcher: the decode path of TP2EP, with no host sync.

Every rank gathers all ranks' token slices and expert ids (V -> R), runs its local
experts on the slots that chose them (the others come out zero), and each slot's
output, held by exactly one rank, is summed back to its owner by reduce_scatter
(P -> V). Adding zeros is exact, so the result equals the all-to-all path bit for bit.
Needs the same token count on every rank (the token layout pads to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from spmd_moe import collectives as C
from spmd_moe.checking import checked
from spmd_moe.dispatch.base import ExpertsFn, count_ids
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var, unchecked_cast


@dataclass(frozen=True)
class AllGatherState:
    num_tokens: int
    top_k: int
    order_N: Int[Placed[Var[EP]], " N"]  # every rank's slots (N = n*T*K), local experts' first


class AllGatherDispatcher:
    # Rows of the other ranks' experts follow the local ones: the GEMMs zero them.
    rows_exact = False

    def __init__(self, num_experts: int, pctx: ParallelContext[EP]):
        self.num_experts = num_experts
        self.pctx = pctx
        self.num_local = num_experts // pctx.size
        self.start = pctx.rank * self.num_local

    @checked(tokens=("x_TD",))
    def dispatch(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " e"], AllGatherState]:
        del num_pad_tokens  # pads carry id E: never local to any rank
        T, K = expert_ids_TK.shape
        e = self.num_local
        # Every rank gathers the same rows (R) and keeps those of its own experts (V).
        x_all: Placed[Var[EP]] = C.rank_view(C.all_gather(x_TD, self.pctx), self.pctx)
        ids_all: Placed[Var[EP]] = C.rank_view(C.all_gather(expert_ids_TK, self.pctx), self.pctx)
        local_all = ids_all - self.start
        # Non-local slots get key e: they sort after every local expert's rows.
        key_N = torch.where((local_all >= 0) & (local_all < e), local_all, e).reshape(-1)
        order_N = torch.argsort(key_N, stable=True)
        counts_e = count_ids(key_N, e + 1)[:e]
        return x_all[order_N // K], counts_e, AllGatherState(T, K, order_N)

    @checked
    def combine(self, out_RD: Float[Placed[Var[EP]], "R D"], state: AllGatherState) -> Float[Placed[Var[EP]], "T K D"]:
        # Rows past the local experts' count are zeros (grouped_mm): every slot not
        # owned here contributes an exact 0 to the sum.
        slots_ND = unchecked_cast(
            Placed[Var[EP]], torch.empty_like(out_RD).index_copy_(0, state.order_N, out_RD),
            reason="this rank's expert outputs, reordered within the rank",
        )
        mine_ND = C.reduce_scatter(C.partial_from_shards(slots_ND, self.pctx), self.pctx)
        return mine_ND.view(state.num_tokens, state.top_k, mine_ND.shape[-1])

    def returned_rows(self, out_RD: Float[Placed[Var[EP]], "R D"], state: AllGatherState) -> None:
        """No fused form: every slot is summed over ranks by reduce_scatter."""
        return None

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
