"""AllToAllDispatcher: the prefill path of TP2EP.

Tokens travel, not rows: each rank sends every token once to each rank that owns at
least one of its K experts, together with its K expert ids (a small int64 exchange).
The receiver expands the tokens into expert-major rows with ONE gather (the source-major
-> expert-major regroup is folded into it), runs its e = E/n local experts, puts the
results back in (source, token, k) order with one gather through the inverse permutation
(computed once from the int64 positions: a scatter of R ints; gathering whole rows is
about twice as fast on CUDA as the index_copy it replaces, same bits; its backward is a
gather too), and sends them back (the mirror exchange); the sender scatters each row
into its slot. With K = 8 and
n = 2 a token has about 4 rows on the other rank but travels there once.

Split sizes: one count exchange per forward (an all_to_all of int64 counts whose size
depends only on n and E, carrying a small header: magic, E, K, D, chunks, compared on
every rank: ranks that disagree raise DistributedError together) and ONE host read of
every split size of the forward.

Rows per expert arrive in the same order as before (source rank, then token order), so
the expert GEMMs see the same rows in the same order and the forward is bitwise the
unchunked row-sending path. The input gradient sums a token's row gradients per rank
first (on the receiver), then over ranks: the same values, another fp summation order.

On CUDA with autograd each piece's rows are padded to a multiple of 8 with zero rows:
the weight-gradient grouped GEMM needs 16-byte rows and would otherwise fall back to a
per-expert loop with a host sync in the backward. The gather that expands the tokens
writes those rows itself, the GEMMs leave their outputs' pad rows undefined and nothing
reads them (no pad copy, zeroed tails or output slice, forward or backward: the one-GPU
path has none of those [R, D]- or [R, F]-sized passes either).

Partial sums on the way back (``partial_return``: MoEConfig.kernels == 'fast'; CUDA,
inference, chunks == 1, not in batch-invariant or debug mode): the gate values travel
with the tokens (packed with their ids, one small exchange), the expert rank sums each
received token's local slots in fp32 (spmd_moe.dispatch._partial_combine: one row per
token and expert rank goes back, fp32, instead of about K/n bf16 rows, and no
permutation of the expert outputs), and the sender adds the ranks' sums in rank order
and rounds once. Not bitwise the row path (one rounding instead of one per term and
add): tests/test_ep_overlap.py states the tolerance. kernels='torchtitan', autograd,
batch-invariant and debug mode keep the bitwise row path.

The fixed-size exchange (no host read; ``equal_tokens``: the caller guarantees that every
rank has the same T, e.g. layout 'replicated'; kernels='fast'; env SPMD_MOE_EP_SYNC_FREE=0
turns it off): a rank sends each token at most once to each peer, so every exchange
carries exactly T rows per peer (equal splits, nothing to read on the host). Rows past a
destination's count carry expert id E (no expert) and are skipped. The receiver's
buffers are sized for the worst case (M = n*T*min(K, e) rows) and every pass over them
stops at the device count (Triton gathers, the SwiGLU, the partial sums; the grouped
GEMMs at their last device offset), so the work is the real work. The way back is the
fp32 partial sum per (token, expert rank), summed by the sender in rank order and
rounded once, as above. Inference, in ``chunks`` pieces with the exchanges on a side
stream; training (autograd, one piece): the backward is the mirror of each exchange
(_FixedDispatch, _FixedCombine). tests/test_sync_free_ep.py states the tolerances.

``chunks`` > 1 (every rank the same): the tokens are split into that many contiguous
pieces; all pieces' dispatch exchanges are issued first, then for each piece its expert
GEMMs and its return exchange. On CUDA the exchanges run on a side stream ordered by
events, so the exchange of piece c+1 (and the return of piece c-1) overlaps the GEMMs
of piece c, in the forward and (autograd runs each backward op on its forward op's
stream) in the backward. On CPU the same code runs in order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

import spmd_types as spmd

from spmd_moe import _debug
from spmd_moe import batch_invariant as _bi
from spmd_moe import collectives as C
from spmd_moe.dispatch import _partial_combine as _pc
from spmd_moe.checking import checked, untracked
from spmd_moe.dispatch.base import ExpertsFn, SentRows, count_per_expert, scatter_to_slots
from spmd_moe.dispatch.validate import _header_device
from spmd_moe.errors import ConfigError, DistributedError
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var, unchecked_cast

_MAGIC = 0xA2A_0E
_HEAD = ("magic", "num_experts", "top_k", "dim", "chunks")
MAX_CHUNKS = 16  # the count message has room for this many pieces: its size never depends on chunks

@dataclass(frozen=True)
class ChunkPlan:
    """Host-side split sizes and device-side indices of one piece of the tokens."""

    t0: int
    t1: int
    send_tok: list[int]  # tokens sent to each rank
    recv_tok: list[int]  # tokens received from each rank
    send_rows: list[int]  # rows (slots) this rank has on each rank's experts (come back from it)
    recv_rows: list[int]  # rows for my experts from each rank (go back to it)
    tok_idx_S: Int[Placed[Var[EP]], " s"]  # tokens sent, destination-major, token order
    slots_S: Int[Placed[Var[EP]], " S"]  # slot (index into N) of each row sent, same order as they come back
    counts_e: Int[Placed[Var[EP]], " e"]  # rows per local expert received in this piece


@dataclass(frozen=True)
class AllToAllState:
    num_tokens: int
    top_k: int
    sent_slots_S: Int[Placed[Var[EP]], " S"]  # slot index (into N) of each row, in returned order
    in_splits: list[int]  # rows this rank has on each rank (returned by it)
    out_splits: list[int]  # rows received from each rank (returned to it)
    back_R: Int[Placed[Var[EP]], " R"]  # expert-major row -> its position in (source, token, k) order
    inv_R: Int[Placed[Var[EP]], " R"]  # (source, token, k) position -> its expert-major row (back_R's inverse)


class _Streams:
    """CUDA: a side stream for the exchanges, ordered against the compute stream by
    events; the caching allocator is told about every cross-stream use. CPU: no-ops."""

    _side: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.on = overlap and device.type == "cuda"
        if self.on:
            self.main = torch.cuda.current_stream(device)
            if device not in _Streams._side:
                _Streams._side[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            self.comm = _Streams._side[device]

    def to_comm(self, *ts: torch.Tensor) -> None:
        """The side stream waits for everything issued so far; ``ts`` are read there."""
        if self.on:
            self.comm.wait_stream(self.main)
            for t in ts:
                t.record_stream(self.comm)

    @contextlib.contextmanager
    def comm_ctx(self) -> Iterator[None]:
        if self.on:
            with torch.cuda.stream(self.comm):
                yield
        else:
            yield

    def mark(self) -> torch.cuda.Event | None:
        """An event after the side stream's work so far."""
        if not self.on:
            return None
        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ev.record(self.comm)
        return ev

    def main_mark(self) -> torch.cuda.Event | None:
        """An event after the compute stream's work so far."""
        if not self.on:
            return None
        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ev.record(self.main)
        return ev

    def comm_wait(self, ev: torch.cuda.Event | None, *ts: torch.Tensor) -> None:
        """The side stream waits for the compute stream's work up to ``ev``; ``ts`` are read there."""
        if self.on and ev is not None:
            self.comm.wait_event(ev)
            for t in ts:
                t.record_stream(self.comm)

    def use(self, ev: torch.cuda.Event | None, *ts: torch.Tensor) -> None:
        """The compute stream waits for the side stream's work up to ``ev``; ``ts``
        (made there) are used on the compute stream."""
        if self.on and ev is not None:
            self.main.wait_event(ev)
            for t in ts:
                t.record_stream(self.main)


class AllToAllDispatcher:
    rows_exact = True

    def __init__(self, num_experts: int, pctx: ParallelContext[EP], chunks: int = 1, partial_return: bool = False):
        self.num_experts = num_experts
        self.partial_return = partial_return  # see the module docstring (kernels='fast')
        self.pctx = pctx
        self.num_local = num_experts // pctx.size
        self.start = pctx.rank * self.num_local
        if not 1 <= chunks <= MAX_CHUNKS:
            raise ConfigError(
                f"MoEConfig.ep_chunks: expected 1..{MAX_CHUNKS}, got {chunks}. "
                "Fix: pass ep_chunks within that range (4 is plenty to overlap)."
            )
        self.chunks = chunks
        self.host_reads = 0  # host syncs issued (one per forward); tests read it
        # The caller guarantees that every rank calls with the same number of tokens T
        # (equal slices, e.g. layout 'replicated'): the fixed-size exchange (T rows per
        # peer, no split sizes on the host) may then be used. See _weighted_fixed.
        self.equal_tokens = False

    # ------------------------------------------------------------ planning
    def plan(self, x_TD: Float[Placed[Var[EP]], "T D"], expert_ids_TK: Int[Placed[Var[EP]], "T K"], chunks: int) -> list[ChunkPlan]:
        """Count exchange and the one host read: every piece's split sizes and indices."""
        n, e, E = self.pctx.size, self.num_local, self.num_experts
        T, K = expert_ids_TK.shape
        dev = expert_ids_TK.device
        # Destination rank of every slot; pads (id E) get n: never sent.
        dest_TK = torch.div(expert_ids_TK, e, rounding_mode="floor")
        hit_Tn = (dest_TK.unsqueeze(-1) == torch.arange(n, device=dev)).any(dim=1)
        if not 1 <= chunks <= MAX_CHUNKS:
            raise ConfigError(
                f"AllToAllDispatcher.chunks: expected 1..{MAX_CHUNKS}, got {chunks}. "
                "Fix: MoEConfig(ep_chunks=...) within that range (4 is plenty to overlap)."
            )
        L = len(_HEAD) + MAX_CHUNKS * (1 + e)
        bounds = [T * c // chunks for c in range(chunks + 1)]
        head = torch.tensor([_MAGIC, E, K, x_TD.shape[-1], chunks], dtype=torch.int64, device=dev)
        parts = [head.expand(n, len(_HEAD))]
        for c in range(chunks):
            t0, t1 = bounds[c], bounds[c + 1]
            tok_n1 = hit_Tn[t0:t1].sum(dim=0, dtype=torch.int64).unsqueeze(1)
            rows_ne = count_per_expert(expert_ids_TK[t0:t1], E).view(n, e)
            parts += [tok_n1, rows_ne]
        parts.append(torch.zeros(n, (MAX_CHUNKS - chunks) * (1 + e), dtype=torch.int64, device=dev))
        msg_nL = unchecked_cast(Placed[Var[EP]], torch.cat(parts, dim=1), reason="this rank's counts per destination")
        recv_nL = C.all_to_all(msg_nL, self.pctx, [1] * n, [1] * n)
        # Every index that does not need the host's split sizes is launched before the
        # host read (the GPU runs them meanwhile; after the read only slicing is left).
        pre = []
        for c in range(chunks):
            t0, t1 = bounds[c], bounds[c + 1]
            o = len(_HEAD) + c * (1 + e)
            # Tokens hit per destination, destination-major then token order: a stable
            # sort of the misses (1) after the hits (0) of the [n, Tc] layout.
            miss_nT = (~hit_Tn[t0:t1]).t().reshape(-1).to(torch.int8)
            tok_all = torch.argsort(miss_nT, stable=True) % max(t1 - t0, 1) + t0
            slots_all = torch.argsort(dest_TK[t0:t1].reshape(-1), stable=True) + t0 * K
            pre.append((tok_all, slots_all, recv_nL[:, o + 1 : o + 1 + e].sum(dim=0)))
        both = torch.stack([msg_nL, recv_nL]).tolist()  # the one host sync of the forward
        self.host_reads += 1
        mine, theirs = both[0], both[1]
        self._check_heads(mine[0][: len(_HEAD)], theirs)
        plans = []
        for c, (tok_all, slots_all, counts_e) in enumerate(pre):
            t0, t1 = bounds[c], bounds[c + 1]
            o = len(_HEAD) + c * (1 + e)
            send_tok = [mine[j][o] for j in range(n)]
            recv_tok = [theirs[j][o] for j in range(n)]
            send_rows = [sum(mine[j][o + 1 : o + 1 + e]) for j in range(n)]
            recv_rows = [sum(theirs[j][o + 1 : o + 1 + e]) for j in range(n)]
            plans.append(ChunkPlan(
                t0, t1, send_tok, recv_tok, send_rows, recv_rows,
                unchecked_cast(Placed[Var[EP]], tok_all[: sum(send_tok)], reason="indices of this rank's tokens"),
                unchecked_cast(Placed[Var[EP]], slots_all[: sum(send_rows)], reason="slot indices of this rank's rows"),
                unchecked_cast(Placed[Var[EP]], counts_e, reason="rows per local expert this rank received"),
            ))
        return plans

    def _check_heads(self, mine: list[int], theirs: list[list[int]]) -> None:
        for r, row in enumerate(theirs):
            for i, name in enumerate(_HEAD):
                if row[i] != mine[i]:
                    raise DistributedError(
                        f"AllToAllDispatcher: ranks disagree on '{name}' on axis '{self.pctx.name}': "
                        f"expected this rank's ({self.pctx.rank}) {mine[i]!r}, got {row[i]!r} from rank {r}. "
                        "Fix: build every rank's layer from the same MoEConfig and set the same "
                        "dispatcher chunks on every rank."
                    )

    # ------------------------------------------------------------ per piece
    def _send(
        self, x_TD: Float[Placed[Var[EP]], "T D"], expert_ids_TK: Int[Placed[Var[EP]], "T K"], p: ChunkPlan
    ) -> tuple[Float[Placed[Var[EP]], "s D"], Int[Placed[Var[EP]], "s K"]]:
        return x_TD[p.tok_idx_S], expert_ids_TK[p.tok_idx_S]

    def _exchange_tokens(
        self, send_sD: Float[Placed[Var[EP]], "s D"], ids_sK: Int[Placed[Var[EP]], "s K"], p: ChunkPlan
    ) -> tuple[Float[Placed[Var[EP]], "r D"], Int[Placed[Var[EP]], "r K"]]:
        recv_rD = C.all_to_all(send_sD, self.pctx, p.send_tok, p.recv_tok)
        recv_ids_rK = C.all_to_all(ids_sK, self.pctx, p.send_tok, p.recv_tok)
        return recv_rD, recv_ids_rK

    def _expand(
        self, recv_rD: Float[Placed[Var[EP]], "r D"], recv_ids_rK: Int[Placed[Var[EP]], "r K"], p: ChunkPlan,
        pad: int = 0,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " R"], Int[Placed[Var[EP]], " R"]]:
        """Received tokens -> expert-major rows (one gather), each row's position in
        (source, token, k) order for the way back, and the inverse of that permutation.
        pad > 0: the gather writes ``pad`` zero rows after the R rows (see _GatherPadded)."""
        K = recv_ids_rK.shape[-1]
        R = sum(p.recv_rows)
        order_R, key_N = self._expert_order(recv_ids_rK, R)
        valid_N = key_N < self.num_local
        pos_N = torch.cumsum(valid_N, dim=0) - 1
        back = pos_N[order_R]
        inv = torch.empty_like(back).scatter_(0, back, torch.arange(R, device=back.device, dtype=back.dtype))
        back_R = unchecked_cast(Placed[Var[EP]], back, reason="a permutation of the rows this rank received")
        inv_R = unchecked_cast(Placed[Var[EP]], inv, reason="its inverse")
        if pad:
            rows_RD = unchecked_cast(
                Placed[Var[EP]], _GatherPadded.apply(recv_rD, order_R // K, pad),  # type: ignore[no-untyped-call]
                reason="this rank's received tokens, expanded to rows, zero rows appended",
            )
            return rows_RD, back_R, inv_R
        return recv_rD[order_R // K], back_R, inv_R

    def _expert_order(
        self, recv_ids_rK: Int[Placed[Var[EP]], "r K"], R: int
    ) -> tuple[Int[Placed[Var[EP]], " R"], Placed[Var[EP]]]:
        """The slots (into r*K) of this rank's experts in expert-major order, and each
        slot's key (local expert index; >= e for the other ranks' experts)."""
        # Local experts keep their index 0..e-1; every other id lands in [e, E) mod E
        # (start <= E - e), so it sorts after them and is cut off with the first R. Two
        # ops instead of five: the host issues every op after the split-size read.
        key_N = torch.remainder(recv_ids_rK.reshape(-1) - self.start, self.num_experts)
        # Stable: within an expert, source rank then token order (as the rows arrived).
        return torch.argsort(key_N, stable=True)[:R], key_N

    @staticmethod
    def _source_major(
        out_RD: Float[Placed[Var[EP]], "R D"], back_R: Int[Placed[Var[EP]], " R"], inv_R: Int[Placed[Var[EP]], " R"]
    ) -> Float[Placed[Var[EP]], "R D"]:
        """Expert-major outputs -> (source, token, k) order: what each source expects back."""
        return unchecked_cast(
            Placed[Var[EP]], _Permute.apply(out_RD, inv_R, back_R),  # type: ignore[no-untyped-call]
            reason="this rank's expert outputs, reordered within the rank",
        )

    # ------------------------------------------------------------ Dispatcher protocol
    @checked(tokens=("x_TD",))
    def dispatch(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
    ) -> tuple[Float[Placed[Var[EP]], "R D"], Int[Placed[Var[EP]], " e"], AllToAllState]:
        del num_pad_tokens  # pads carry id E: owned by no rank, never sent
        T, K = expert_ids_TK.shape
        (p,) = self.plan(x_TD, expert_ids_TK, 1)
        recv_rD, recv_ids_rK = self._exchange_tokens(*self._send(x_TD, expert_ids_TK, p), p)
        routed_RD, back_R, inv_R = self._expand(recv_rD, recv_ids_rK, p)
        state = AllToAllState(T, K, p.slots_S, p.send_rows, p.recv_rows, back_R, inv_R)
        return routed_RD, p.counts_e, state

    @checked
    def returned_rows(self, out_RD: Float[Placed[Var[EP]], "R D"], state: AllToAllState) -> SentRows:
        """The expert outputs back on their source rank, with the slot of each."""
        source_major_RD = self._source_major(out_RD, state.back_R, state.inv_R)
        back_SD = C.all_to_all(source_major_RD, self.pctx, state.out_splits, state.in_splits)
        return SentRows(back_SD, state.sent_slots_S)

    @checked
    def combine(self, out_RD: Float[Placed[Var[EP]], "R D"], state: AllToAllState) -> Float[Placed[Var[EP]], "T K D"]:
        back = self.returned_rows(out_RD, state)
        slots_ND = scatter_to_slots(back.rows_SD, back.slots_S, state.num_tokens * state.top_k)
        return slots_ND.view(state.num_tokens, state.top_k, slots_ND.shape[-1])

    def weighted(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        weights_TK: Float[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
        experts: ExpertsFn,
    ) -> Float[Placed[Var[EP]], "T D"] | None:
        """The whole routed part with fp32 partial sums on the way back (see the module
        docstring), or None where it does not apply (the caller runs the row path)."""
        del num_pad_tokens  # pads carry id E: owned by no rank, never sent
        if self.equal_tokens and _debug._enabled:
            self._check_equal_tokens(x_TD.shape[0])
        if not self.partial_return or _bi._enabled or _debug._enabled or spmd.is_type_checking():
            return None
        if not (x_TD.device.type == "cuda" or PARTIAL_ON_CPU):
            return None
        # The fixed-size path: inference (in ``chunks`` pieces) and training (one piece).
        if self.equal_tokens and sync_free() and (self.chunks == 1 or not torch.is_grad_enabled()):
            return self._weighted_fixed(x_TD, expert_ids_TK, weights_TK, experts)
        if self.chunks != 1 or torch.is_grad_enabled():
            return None
        T, K = expert_ids_TK.shape
        n, dev = self.pctx.size, x_TD.device
        # Before the host read: where each token's sum from rank j will sit in the returned
        # rows (destination-major, token order, as sent), or -1 if it is not sent there.
        hit_Tn = (torch.div(expert_ids_TK, self.num_local, rounding_mode="floor").unsqueeze(-1)
                  == torch.arange(n, device=dev)).any(dim=1)
        # One 1-D scan over the [n, T] layout (destination-major, token order: the order
        # sent). A scan down dim 0 of [T, n] took 1.5 ms at T=16384 on H200 (n columns only).
        hit_N = hit_Tn.t().reshape(-1)
        pos_Tn = torch.where(hit_N, torch.cumsum(hit_N, dim=0) - 1, -1).view(n, T).t().contiguous()
        # Ids (< 2^24: exact in fp32) and gate values travel in one exchange.
        meta_TM = torch.cat([expert_ids_TK.to(torch.float32), weights_TK.float()], dim=1)
        (p,) = self.plan(x_TD, expert_ids_TK, 1)
        send_sD = x_TD[p.tok_idx_S]
        meta_sM = unchecked_cast(Placed[Var[EP]], meta_TM[p.tok_idx_S], reason="ids and gate values of the tokens this rank sends")
        recv_rD = C.all_to_all(send_sD, self.pctx, p.send_tok, p.recv_tok)
        recv_meta_rM = C.all_to_all(meta_sM, self.pctx, p.send_tok, p.recv_tok)
        order_R, _ = self._expert_order(recv_meta_rM[:, :K].to(torch.int64), sum(p.recv_rows))
        out_RD = experts(recv_rD[order_R // K], p.counts_e, True)
        part_rD = unchecked_cast(
            Placed[Var[EP]], _pc.partial_sums(out_RD, order_R, recv_meta_rM[:, K:]),
            reason="per received token: the fp32 sum over this rank's experts",
        )
        back_sD = C.all_to_all(part_rD, self.pctx, p.recv_tok, p.send_tok)
        # 0 + rank 0's sum + rank 1's + ... in fp32 (a fixed order), one rounding.
        y_TD = _pc.sum_over_ranks(back_sD, pos_Tn, p.tok_idx_S, p.send_tok, x_TD.dtype)
        return unchecked_cast(Placed[Var[EP]], y_TD, reason="this rank's tokens' routed output")

    # ------------------------------------------------------------ fixed-size exchange
    def _check_equal_tokens(self, T: int) -> None:
        """Debug mode (where the fixed-size path is not taken; a host read is fine): the
        promise behind ``equal_tokens``, every rank the same T, checked on every call. With
        debug off a broken promise would leave the fixed-size exchange waiting for rows
        that never come (NCCL hangs); here every rank raises, naming the counts."""
        pctx = self.pctx
        if pctx.size == 1:
            return
        with untracked():  # metadata, not placed data
            mine = torch.tensor([T], dtype=torch.int64, device=_header_device(pctx))
            counts = pctx.backend.all_gather(mine).tolist()
        if len(set(counts)) > 1:
            raise DistributedError(
                f"AllToAllDispatcher: equal_tokens on axis '{pctx.name}': expected every rank to pass the same "
                f"number of tokens, got T={T} on this rank ({pctx.rank}) and {counts} on ranks 0..{pctx.size - 1}. "
                "Fix: pad every rank's tokens to the same T, or turn equal tokens off (MoEConfig.ep_equal_tokens="
                "False; layout 'sequence' with unequal slices). With debug mode off the fixed-size exchange would hang."
            )


    def _fixed_plan(
        self, expert_ids_TK: Int[Placed[Var[EP]], "T K"]
    ) -> tuple[Int[Placed[Var[EP]], " N"], Int[Placed[Var[EP]], "T n"]]:
        """The send buffer of the fixed-size exchange, on the device only: segment j (T
        rows, N = n*T in all) holds the tokens going to rank j packed at its start, in
        token order (a rank gets each token at most once, so T rows always suffice).
        Returns each buffer row's token (T: no token, the rows past the segment's count)
        and, per token and rank, its row in the buffer (-1: not sent there)."""
        n, e = self.pctx.size, self.num_local
        T = expert_ids_TK.shape[0]
        dev = expert_ids_TK.device
        planned = _pc.fixed_plan(expert_ids_TK, e, n)  # CUDA: one kernel (the same values)
        if planned is not None:
            return (unchecked_cast(Placed[Var[EP]], planned[0], reason="token of each row this rank sends"),
                    unchecked_cast(Placed[Var[EP]], planned[1], reason="where this rank's tokens sit in its send buffer"))
        ranks_n1 = torch.arange(n, device=dev).view(n, 1)
        dest_TK = torch.div(expert_ids_TK, e, rounding_mode="floor")  # pads (id E): rank n, sent nowhere
        hit_nT = (dest_TK.unsqueeze(0) == ranks_n1.unsqueeze(-1)).any(dim=2)
        # A scan along the last dim of [n, T] (contiguous; down dim 0 of [T, n] was 1.5 ms).
        row_nT = torch.where(hit_nT, torch.cumsum(hit_nT, dim=1) - 1 + ranks_n1 * T, n * T)
        tok_all = torch.full((n * T + 1,), T, dtype=torch.int64, device=dev)
        tok_all.scatter_(0, row_nT.reshape(-1), torch.arange(T, device=dev).repeat(n))  # row n*T: dropped
        pos_Tn = torch.where(hit_nT, row_nT, -1).t().contiguous()
        return (unchecked_cast(Placed[Var[EP]], tok_all[: n * T], reason="token of each row this rank sends"),
                unchecked_cast(Placed[Var[EP]], pos_Tn, reason="where this rank's tokens sit in its send buffer"))

    def _fixed_expert_order(
        self, recv_ids_NK: Int[Placed[Var[EP]], "N K"]
    ) -> tuple[Int[Placed[Var[EP]], " M"], Int[Placed[Var[EP]], " e"]]:
        """The received slots (into N*K) in expert-major order, cut to M = N*min(K, e)
        (no token has more local slots): the first sum(counts_e) are this rank's
        experts' (source rank, then token order within an expert, as on the split-size
        path), the rest belong to no local expert. And the rows per local expert."""
        e, N, K = self.num_local, recv_ids_NK.shape[0], recv_ids_NK.shape[1]
        local_NK = recv_ids_NK - self.start
        key_X = torch.where((local_NK >= 0) & (local_NK < e), local_NK, e).reshape(-1)  # e: not here (or no token)
        if e < 2**15:  # the same stable permutation on int16 keys (fewer radix passes on CUDA)
            key_X = key_X.to(torch.int16)
        sorted_X, order_X = torch.sort(key_X, stable=True)
        order_M = order_X[: N * min(K, e)]
        # Rows per expert from the sorted keys' boundaries: e+1 binary searches, where a
        # scatter_add of N*K ones into e+1 counters contends on a few addresses.
        bounds_b = torch.searchsorted(sorted_X, torch.arange(e + 1, device=key_X.device, dtype=key_X.dtype))
        counts_e = torch.diff(bounds_b)
        return (unchecked_cast(Placed[Var[EP]], order_M, reason="slots of this rank's experts first"),
                unchecked_cast(Placed[Var[EP]], counts_e, reason="rows per local expert this rank received"))

    def _weighted_fixed(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        weights_TK: Float[Placed[Var[EP]], "T K"],
        experts: ExpertsFn,
    ) -> Float[Placed[Var[EP]], "T D"]:
        """``weighted`` with no host read, forward and backward: every exchange carries
        exactly T rows per peer (equal splits; every rank has T tokens: ``equal_tokens``),
        the rows past a segment's count carry expert id E (no expert) and are skipped by
        the receiver. Every count stays on the device: the expert GEMMs get device offsets
        and the [M, D] buffers are sized for the worst case (M = N*min(K, e), N = n*T);
        the gathers and sums stop at the device count, the GEMMs at the last offset."""
        if self.chunks > 1 and not torch.is_grad_enabled():
            return self._weighted_fixed_pieces(x_TD, expert_ids_TK, weights_TK, experts)
        tok_N, pos_Tn = self._fixed_plan(expert_ids_TK)
        routed_MD, recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R = _FixedDispatch.apply(  # type: ignore[no-untyped-call]
            x_TD, weights_TK, expert_ids_TK, self, tok_N, pos_Tn)
        out_MD = _experts_bounded(experts, routed_MD, counts_e, rows_R)
        y_TD = _FixedCombine.apply(out_MD, recv_w_NK, row_of_slot_X, order_M, rows_R, pos_Tn, tok_N, self.pctx, x_TD.dtype)  # type: ignore[no-untyped-call]
        return unchecked_cast(Placed[Var[EP]], y_TD, reason="this rank's tokens' routed output")

    def _weighted_fixed_pieces(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        weights_TK: Float[Placed[Var[EP]], "T K"],
        experts: ExpertsFn,
    ) -> Float[Placed[Var[EP]], "T D"]:
        """Inference, ``chunks`` > 1: the fixed-size path on contiguous pieces of the
        tokens (every rank splits its T the same way, so the pieces are equal too), the
        exchanges on a side stream: every piece's dispatch first, then per piece its
        experts and its return, so the dispatch of piece c+1 and the return of piece c-1
        overlap the GEMMs of piece c. With no host read the host stays ahead of the GPU
        (with the split sizes it did not: more pieces were slower). Each piece's output
        is its own tokens' (the same sums as one piece: bitwise where the GEMMs are)."""
        T, K = expert_ids_TK.shape
        pctx, dev = self.pctx, x_TD.device
        bounds = [T * c // self.chunks for c in range(self.chunks + 1)]
        st = _Streams(dev, overlap=True)
        y_TD = torch.empty(T, x_TD.shape[-1], dtype=x_TD.dtype, device=dev)
        pieces = []
        for t0, t1 in zip(bounds, bounds[1:]):
            tok_N, pos_Tn = self._fixed_plan(unchecked_cast(Placed[Var[EP]], expert_ids_TK[t0:t1], reason="a piece of this rank's tokens"))
            send = _fixed_send(self, x_TD[t0:t1], weights_TK[t0:t1], expert_ids_TK[t0:t1], tok_N)
            pieces.append((t0, t1, pos_Tn, send))
        st.to_comm(*(t for p in pieces for t in p[3]))
        recvs = []
        with st.comm_ctx():
            for t0, t1, _, (send_ND, send_meta_NM) in pieces:
                recv = (_a2a_equal(pctx, send_ND, t1 - t0), _a2a_equal(pctx, send_meta_NM, t1 - t0))
                recvs.append((recv, st.mark()))
        backs = []
        for (t0, t1, _, _), ((recv_ND, recv_meta_NM), ev) in zip(pieces, recvs):
            st.use(ev, recv_ND, recv_meta_NM)
            routed_MD, recv_w_NK, counts_e, row_of_slot_X, _, rows_R = _fixed_expand(self, recv_ND, recv_meta_NM)
            with _sm_carveout(dev):
                out_MD = _experts_bounded(experts, routed_MD, counts_e, rows_R)
            part_ND = _pc.partial_sums_mapped(out_MD, row_of_slot_X, recv_w_NK, out_dtype=return_dtype(x_TD.dtype))
            st.comm_wait(st.main_mark(), part_ND)
            with st.comm_ctx():
                backs.append((_a2a_equal(pctx, part_ND, t1 - t0), st.mark()))
        for (t0, t1, pos_Tn, _), (back_ND, ev) in zip(pieces, backs):
            st.use(ev, back_ND)
            _pc.sum_over_ranks_at(back_ND, pos_Tn, x_TD.dtype, out=y_TD[t0:t1])
        return unchecked_cast(Placed[Var[EP]], y_TD, reason="this rank's tokens' routed output")

    def pipelined(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        num_pad_tokens: int,
        experts: ExpertsFn,
    ) -> SentRows | None:
        """Dispatch, experts and return in ``chunks`` overlapped pieces; None when
        chunks == 1 (the caller runs dispatch -> experts -> returned_rows)."""
        del num_pad_tokens
        if self.chunks <= 1 and not _pad_for_backward(x_TD):
            return None

        plans = self.plan(x_TD, expert_ids_TK, self.chunks)
        # Debug mode tracks placements through every op: typed collectives in order there.
        tracked = spmd.is_type_checking()
        st = _Streams(x_TD.device, overlap=not tracked)
        sends = [self._send(x_TD, expert_ids_TK, p) for p in plans]
        st.to_comm(*(t for s in sends for t in s))
        # Every piece's dispatch first: on the side stream they run back to back while
        # the GEMMs of the earlier pieces run on the compute stream.
        recvs = []
        with st.comm_ctx():
            for p, (send_sD, ids_sK) in zip(plans, sends):
                recv = self._exchange_tokens(send_sD, ids_sK, p)
                recvs.append((recv, st.mark()))
        link = _Link(st, len(plans))
        outs: list[torch.Tensor] = []
        for c, (p, ((recv_rD, recv_ids_rK), ev)) in enumerate(zip(plans, recvs)):
            st.use(ev, recv_rD, recv_ids_rK)
            # The CUDA weight-gradient GEMM needs 16-byte rows (else a per-expert loop
            # with a host sync): the gather itself appends zero rows past the last expert
            # (no F.pad copy, no slice of the outputs: _Permute reads rows < R only and
            # gives the pad rows a zero gradient). rows_exact=True even then: the GEMMs
            # leave the outputs' pad rows undefined instead of zeroing whole [R, F] and
            # [R, D] tensors (six full passes, fwd + bwd); nothing reads those rows (the
            # grouped GEMMs, the weight gradients included, stop at the last offset).
            pad = -sum(p.recv_rows) % 8 if _pad_for_backward(x_TD) else 0
            routed_RD, back_R, inv_R = self._expand(recv_rD, recv_ids_rK, p, pad)
            out_RD = experts(routed_RD, p.counts_e, True)
            source_major_RD = self._source_major(out_RD, back_R, inv_R)
            if tracked:
                outs.append(C.all_to_all(source_major_RD, self.pctx, p.recv_rows, p.send_rows))
            else:
                link.ready[c] = st.main_mark()
                outs.append(_GradWait.apply(source_major_RD, link, c))  # type: ignore[no-untyped-call]
        if tracked:
            rows = _cat(outs)
        else:
            splits = [(p.recv_rows, p.send_rows) for p in plans]
            rows = _ReturnAll.apply(self.pctx.backend, link, splits, *outs)  # type: ignore[no-untyped-call]
        rows_SD = unchecked_cast(Placed[Var[EP]], rows, reason="this rank's returned rows")
        slots_S = unchecked_cast(Placed[Var[EP]], _cat([p.slots_S for p in plans]), reason="their slots")
        return SentRows(rows_SD, slots_S)


def sync_free() -> bool:
    """SPMD_MOE_EP_SYNC_FREE (default on): the fixed-size exchange where it applies
    (``equal_tokens``); 0: the split-size path with its one host read per forward."""
    return os.environ.get("SPMD_MOE_EP_SYNC_FREE", "1") != "0"


@contextlib.contextmanager
def _sm_carveout(dev: torch.device) -> Iterator[None]:
    """SPMD_MOE_EP_SM_CARVEOUT=k (CUDA, pieces only; default off): the persistent grouped
    GEMMs leave k SMs free (torch's experimental SM carveout) so that the NCCL kernel of
    the next piece's exchange can run beside them; the previous setting is restored."""
    k = int(os.environ.get("SPMD_MOE_EP_SM_CARVEOUT", "0") or 0)
    if k <= 0 or dev.type != "cuda" or not hasattr(torch._C, "_set_sm_carveout_experimental"):
        yield
        return
    prev = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(k)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev)


def return_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the partial sums on the fixed-size path's way back: fp32 (default: the
    sender rounds once), or with SPMD_MOE_EP_RETURN=low the layer's own dtype (half the
    bytes of the largest exchange; each rank's partial sum is rounded before the sender's
    fp32 sum rounds again: n+1 roundings instead of one, still fewer than the row path's)."""
    return x_dtype if os.environ.get("SPMD_MOE_EP_RETURN", "fp32") == "low" else torch.float32


PAD_ROWS_ON_CPU = False  # tests: run the CUDA row padding on the CPU too
PARTIAL_ON_CPU = False  # tests: the partial-sum return (kernels='fast', CUDA inference) on the CPU too


def _pad_for_backward(x_TD: torch.Tensor) -> bool:
    """CUDA with autograd: the expert rows are padded to a multiple of 8 (see pipelined)."""
    on = x_TD.device.type == "cuda" or PAD_ROWS_ON_CPU
    return on and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _a2a_equal(pctx: ParallelContext[EP], x: torch.Tensor, rows: int) -> torch.Tensor:
    """The fixed-size exchange: ``rows`` rows of dim 0 to and from every rank (bytes only)."""
    if pctx.size == 1:
        return x
    return pctx.backend.all_to_all(x.contiguous(), [rows] * pctx.size, [rows] * pctx.size)


def _experts_bounded(
    experts: ExpertsFn, routed_MD: torch.Tensor, counts_e: torch.Tensor, rows_1: torch.Tensor
) -> torch.Tensor:
    """experts(routed_MD, counts_e, rows_exact=True) where the fused SwiGLU would run over
    all M worst-case rows (2x the real rows at n=2, K=8, E=128; 4x at n=4): the same
    three grouped GEMMs (device offsets: they stop at the last one) with a SwiGLU that
    stops at the device row count (the same arithmetic, so the same bits on those rows).
    Anything else (another experts module, an expert dtype cast, no fused kernels) runs
    ``experts`` itself."""
    from spmd_moe import experts as _ex
    from spmd_moe.kernels import fused_bwd as _fb

    def plain() -> torch.Tensor:
        return experts(unchecked_cast(Placed[Var[EP]], routed_MD, reason="this rank's expert-major rows"),
                       unchecked_cast(Placed[Var[EP]], counts_e, reason="rows per local expert"), True)

    if type(experts) is not _ex.GroupedExperts or experts.cfg.expert_dtype not in (None, routed_MD.dtype):
        return plain()
    w1, w2, w3 = experts.w1_EFD, experts.w2_EDF, experts.w3_EFD
    kernels = experts.cfg.kernels
    fused = _fb.applies(kernels, w1, w3, routed_MD) or _fb.applies_forward(kernels, w1, w3, routed_MD)
    if not fused or not _ex._grouped_mm_ok(routed_MD, w1) or not _pc.use_kernel(routed_MD):
        return plain()
    offs = torch.cumsum(counts_e, dim=0, dtype=torch.int32)  # once for the three GEMMs
    x = unchecked_cast(Placed[Var[EP]], routed_MD, reason="this rank's expert-major rows")
    c = unchecked_cast(Placed[Var[EP]], counts_e, reason="rows per local expert")
    a1_MF = _ex.grouped_mm(x, w1, c, zero_tail=False, offs_e=offs)
    a3_MF = _ex.grouped_mm(x, w3, c, zero_tail=False, offs_e=offs)
    h_MF = unchecked_cast(Placed[Var[EP]], _pc.swiglu_bounded(a1_MF, a3_MF, rows_1, routed_MD.dtype == torch.bfloat16),
                          reason="elementwise on this rank's rows")
    return _ex.grouped_mm(h_MF, w2, c, zero_tail=False, offs_e=offs)


def _fixed_send(
    disp: AllToAllDispatcher, x_TD: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, tok_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The send buffers of the fixed-size exchange: [N, D] tokens, [N, 2K] fp32 (ids, gate
    values). Ids (< 2^24: exact in fp32) and gate values travel in one exchange; the
    unused rows get ids E (no expert anywhere) from a sentinel row, and copy the last
    token (never read: no sentinel row appended to x)."""
    T = ids_TK.shape[0]
    # Row T: the sentinel, E everywhere (its gate values are never read: no expert has it).
    meta_TM = F.pad(torch.cat([ids_TK.to(torch.float32), w_TK.float()], dim=1), (0, 0, 0, 1), value=float(disp.num_experts))
    return x_TD[tok_N.clamp(max=max(T - 1, 0))], meta_TM[tok_N]


def _fixed_expand(disp: AllToAllDispatcher, recv_ND: torch.Tensor, recv_meta_NM: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Received tokens -> expert-major rows [M, D] (M a multiple of 8 >= N*min(K, e)),
    with the received gate values [N, K], rows per local expert, the slot -> row map
    (-1: no row here), the slot order and the device row count R (rows past it: left
    undefined, nothing reads them)."""
    K = recv_meta_NM.shape[1] // 2
    dev = recv_ND.device
    order_M, counts_e = disp._fixed_expert_order(
        unchecked_cast(Placed[Var[EP]], recv_meta_NM[:, :K].to(torch.int64), reason="ids of the received tokens"))
    rows_R = counts_e.sum().view(1)  # device count: rows past it belong to no local expert
    N, M = recv_ND.shape[0], order_M.shape[0]
    ar_M = torch.arange(M, device=dev)
    row_of_slot_X = torch.full((N * K,), -1, dtype=torch.int64, device=dev)
    row_of_slot_X.scatter_(0, order_M, torch.where(ar_M < rows_R, ar_M, -1))
    # A multiple of 8 rows: the CUDA weight-gradient GEMM needs 16-byte rows (else a
    # per-expert loop with a host read). The extra rows are past the count: not written.
    order_M = F.pad(order_M, (0, -M % 8))
    routed_MD = _pc.gather_rows(recv_ND, order_M, K, rows_R)
    return routed_MD, recv_meta_NM[:, K:].contiguous(), counts_e, row_of_slot_X, order_M, rows_R


class _FixedDispatch(torch.autograd.Function):
    """The fixed-size dispatch: the tokens and their (ids, gate values) go out T rows per
    peer; the receiver expands them to expert-major rows (a gather that stops at the
    device count). Outputs: the rows [M, D], the received gate values [N, K] (fp32,
    differentiable), and (not differentiable) rows per local expert, the slot -> row map
    (-1: no row here), the slot order and the device row count.

    Backward, the mirror: on the receiver each received token's row gradients summed in
    fp32 and rounded once (the partial-sum kernel with unit weights: no atomics), the
    fixed-size exchange back, the sender's sum over ranks (fp32, rank order, one
    rounding); the gate values' gradients travel back the same way."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, disp: AllToAllDispatcher,
                tok_N: torch.Tensor, pos_Tn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = ids_TK.shape[0]
        send_ND, send_meta_NM = _fixed_send(disp, x_TD, w_TK, ids_TK, tok_N)
        recv_ND, recv_meta_NM = _a2a_equal(disp.pctx, send_ND, T), _a2a_equal(disp.pctx, send_meta_NM, T)
        routed_MD, recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R = _fixed_expand(disp, recv_ND, recv_meta_NM)
        ctx.save_for_backward(row_of_slot_X, pos_Tn)
        ctx.pctx, ctx.T, ctx.x_dtype, ctx.w_dtype = disp.pctx, T, x_TD.dtype, w_TK.dtype
        ctx.mark_non_differentiable(counts_e, row_of_slot_X, order_M, rows_R)
        return routed_MD, recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R

    @staticmethod
    def backward(ctx: Any, g_MD: torch.Tensor | None, g_NK: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        row_of_slot_X, pos_Tn = ctx.saved_tensors
        T = ctx.T
        N = pos_Tn.shape[1] * T
        K = row_of_slot_X.shape[0] // N if N else 0
        g_x = g_w = None
        if ctx.needs_input_grad[0] and g_MD is not None:
            ones_NK = torch.ones(N, K, dtype=torch.float32, device=g_MD.device)
            g_recv_ND = _pc.partial_sums_mapped(g_MD, row_of_slot_X, ones_NK, out_dtype=ctx.x_dtype)
            g_x = _pc.sum_over_ranks_at(_a2a_equal(ctx.pctx, g_recv_ND, T), pos_Tn, ctx.x_dtype)
        if ctx.needs_input_grad[1] and g_NK is not None:
            g_w = _pc.sum_over_ranks_at(_a2a_equal(ctx.pctx, g_NK.float(), T), pos_Tn, ctx.w_dtype)
        return g_x, g_w, None, None, None, None


class _FixedCombine(torch.autograd.Function):
    """The way back of the fixed-size path: the expert rank's fp32 partial sum per
    received token (over its local slots, ascending k), the fixed-size exchange back,
    the sender's sum over ranks in rank order, one rounding.

    Backward: a token's sum from rank j has gradient g_y[t] (so the mirror exchange
    carries g_y's own values, in its dtype: exact); each slot row's gradient is
    w * g (fp32, one rounding; a gather that stops at the device count) and each gate
    value's <g, row> in fp32."""

    @staticmethod
    def forward(ctx: Any, out_MD: torch.Tensor, w_NK: torch.Tensor, row_of_slot_X: torch.Tensor, order_M: torch.Tensor,
                rows_R: torch.Tensor, pos_Tn: torch.Tensor, tok_N: torch.Tensor, pctx: ParallelContext[EP],
                y_dtype: torch.dtype) -> torch.Tensor:
        T = pos_Tn.shape[0]
        part_ND = _pc.partial_sums_mapped(out_MD, row_of_slot_X, w_NK, out_dtype=return_dtype(y_dtype))
        y_TD = _pc.sum_over_ranks_at(_a2a_equal(pctx, part_ND, T), pos_Tn, y_dtype)
        ctx.save_for_backward(out_MD, w_NK, row_of_slot_X, order_M, rows_R, tok_N)
        ctx.pctx, ctx.T = pctx, T
        return y_TD

    @staticmethod
    def backward(ctx: Any, g_TD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out_MD, w_NK, row_of_slot_X, order_M, rows_R, tok_N = ctx.saved_tensors
        T, K = ctx.T, w_NK.shape[1]
        # The rows this rank sent, in the same layout: token tok_N[r]'s gradient (rows past
        # a segment's count: any token's, never read).
        g_ND = _a2a_equal(ctx.pctx, g_TD.contiguous()[tok_N.clamp(max=max(T - 1, 0))], T)
        g_out_MD = _pc.gather_rows(g_ND, order_M, K, rows_R, scale_X=w_NK.reshape(-1), out_dtype=out_MD.dtype)
        g_w_NK = _pc.slot_weight_grads(g_ND, out_MD, row_of_slot_X, K)
        return g_out_MD, g_w_NK, None, None, None, None, None, None, None


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without its full copy when there is one piece (chunks == 1)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


@spmd.register_local_autograd_function  # a permutation of this rank's rows: placements propagate
class _Permute(torch.autograd.Function):
    """y = x[perm] (a gather of whole rows); backward: grad_x = grad_y[inv] (inv = perm's
    inverse), a gather too, where indexing's own backward would scatter-add.

    x may have rows past R = len(perm) (the pad rows of pipelined): they are not read,
    and their gradient is zero, written by the gather itself (index 0, then zeroed: a
    few rows) where a slice's backward would zero-fill and copy the whole [R, D]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.pad = x.shape[0] - perm.shape[0]
        return x[perm]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inv,) = ctx.saved_tensors
        if not ctx.pad:
            return g[inv], None, None
        R = inv.shape[0]
        gx = g[F.pad(inv, (0, ctx.pad))]
        gx[R:].zero_()
        return gx, None, None


@spmd.register_local_autograd_function  # rows of this rank's received tokens: placements propagate
class _GatherPadded(torch.autograd.Function):
    """y = x[idx] followed by ``pad`` zero rows, in one gather (idx padded with row 0,
    those rows then zeroed: a few rows) where F.pad after the gather copies all of
    [R, D] again, and its backward once more. Backward: the very call indexing's own
    backward makes (index_put_ accumulate into zeros, on the R real rows' gradient),
    so the same kernel, order and bits; the pad rows' gradient is dropped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, idx: torch.Tensor, pad: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = x.shape[0]
        R = idx.shape[0]
        if x.shape[0] == 0:  # then R == 0 too: nothing to gather
            return x.new_zeros(pad, *x.shape[1:])
        y = x[F.pad(idx, (0, pad))]
        y[R:].zero_()
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (idx,) = ctx.saved_tensors
        gx = g.new_zeros(ctx.rows, *g.shape[1:])
        gx.index_put_((idx,), g[: idx.shape[0]], accumulate=True)
        return gx, None, None


class _Link:
    """What the return exchange and its per-piece gradient waits share: the compute
    stream's mark after each piece's outputs (forward) and the side stream's mark after
    each piece's gradient exchange (backward)."""

    def __init__(self, st: _Streams, chunks: int) -> None:
        self.st = st
        self.ready: list[torch.cuda.Event | None] = [None] * chunks
        self.grad_ready: list[torch.cuda.Event | None] = [None] * chunks


class _GradWait(torch.autograd.Function):
    """Identity forward; backward makes the compute stream wait for this piece's
    gradient exchange only (not the later pieces'), so the backward GEMMs of one piece
    overlap the exchanges of the next."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: _Link, c: int) -> torch.Tensor:
        ctx.link, ctx.c = link, c
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        link: _Link = ctx.link
        link.st.use(link.grad_ready[ctx.c], g)
        return g, None, None


class _ReturnAll(torch.autograd.Function):
    """The return exchanges of every piece, issued on the side stream, each after its
    piece's outputs are ready; backward issues every piece's mirror exchange at once
    (the gradients of all pieces are ready together) and marks each."""

    @staticmethod
    def forward(ctx: Any, comm: Any, link: _Link, splits: list[tuple[list[int], list[int]]], *outs: torch.Tensor) -> torch.Tensor:
        ctx.comm, ctx.link, ctx.splits = comm, link, splits
        st = link.st
        backs = []
        for c, (x, (send, recv)) in enumerate(zip(outs, splits)):
            st.comm_wait(link.ready[c], x)
            with st.comm_ctx():
                backs.append(comm.all_to_all(x.contiguous(), send, recv))
        st.use(st.mark(), *backs)
        return _cat(backs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        link: _Link = ctx.link
        st = link.st
        g = g.contiguous()
        st.to_comm(g)
        grads = []
        off = 0
        with st.comm_ctx():
            for c, (send, recv) in enumerate(ctx.splits):
                gc = g.narrow(0, off, sum(recv))
                off += sum(recv)
                grads.append(ctx.comm.all_to_all(gc.contiguous(), recv, send))
                link.grad_ready[c] = st.mark()
        return (None, None, None, *grads)
