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

The fixed-size exchange (no host read; ``equal_tokens``: every rank has the same T;
kernels='fast'): spmd_moe.dispatch.fixed_exchange, called from ``weighted``.

``chunks`` > 1 (every rank the same): the tokens are split into that many contiguous
pieces; all pieces' dispatch exchanges are issued first, then for each piece its expert
GEMMs and its return exchange. On CUDA the exchanges run on a side stream ordered by
events, so the exchange of piece c+1 (and the return of piece c-1) overlaps the GEMMs
of piece c, in the forward and (autograd runs each backward op on its forward op's
stream) in the backward. On CPU the same code runs in order.
"""

from __future__ import annotations

import contextlib
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
from spmd_moe.checking import checked
from spmd_moe.dispatch.base import ExpertsFn, SentRows, count_per_expert, scatter_to_slots
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
                # High priority: the block scheduler starts the exchange's kernels as soon as
                # a compute kernel's blocks retire, instead of after the whole grid.
                _Streams._side[device] = torch.cuda.Stream(device, priority=-1)  # type: ignore[no-untyped-call]
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
        # peer, no split sizes on the host) may then be used: spmd_moe.dispatch.fixed_exchange.
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
        from spmd_moe.dispatch import fixed_exchange as _fx  # imports this module: not at the top

        if self.equal_tokens and _debug._enabled:
            _fx.check_equal_tokens(self, x_TD.shape[0])
        if not self.partial_return or _bi._enabled or _debug._enabled or spmd.is_type_checking():
            return None
        if not (x_TD.device.type == "cuda" or PARTIAL_ON_CPU):
            return None
        # The fixed-size path: inference (in ``chunks`` pieces) and training (one piece).
        if self.equal_tokens and _fx.sync_free() and (self.chunks == 1 or not torch.is_grad_enabled()):
            return _fx.weighted_fixed(self, x_TD, expert_ids_TK, weights_TK, experts)
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


PAD_ROWS_ON_CPU = False  # tests: run the CUDA row padding on the CPU too
PARTIAL_ON_CPU = False  # tests: the partial-sum return (kernels='fast', CUDA inference) on the CPU too


def _pad_for_backward(x_TD: torch.Tensor) -> bool:
    """CUDA with autograd: the expert rows are padded to a multiple of 8 (see pipelined)."""
    on = x_TD.device.type == "cuda" or PAD_ROWS_ON_CPU
    return on and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


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
