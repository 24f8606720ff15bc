"""The all-to-all dispatcher's fixed-size exchange: the EP routed forward and backward
with no host read (issue 13).

What: with ``AllToAllDispatcher.equal_tokens`` (every rank has T tokens) a rank sends each
token at most once to each peer, so every exchange carries exactly T rows per peer (equal
splits: no split sizes on the host). Rows past a destination's count carry expert id E
and are skipped. The receiver's buffers are sized for the worst case (M = n*T*min(K, e)
rows, a multiple of 8) and every pass over them stops at the device count (the Triton
kernels of spmd_moe.dispatch._partial_combine; the grouped GEMMs at their last device
offset). The way back is one partial sum per (token, expert rank), fp32 by default, summed
by the sender in rank order and rounded once. Inference runs local first from 8192
tokens per rank (weighted_fixed_local_first: a rank's own tokens never travel, and the
exchanges run under their GEMMs; spmd_moe.dispatch._transport moves the rows), or in
``chunks`` pieces (the exchanges on a side stream); training (autograd) in one piece,
each exchange's backward its mirror.

Why: the split-size path reads every split size on the host once per forward; the GPU
then idles while the host issues the rest, and the layer cannot be captured in a CUDA
graph.

Not bitwise the row path: one rounding of the fp32 sum instead of one per term and add
(tests/test_sync_free_ep.py states the tolerances); with SPMD_MOE_EP_RETURN=low each
rank's partial sum is rounded to the layer's dtype as well. Switches: SPMD_MOE_EP_SYNC_FREE=0
(the split-size path), SPMD_MOE_EP_RETURN=low, SPMD_MOE_EP_SM_CARVEOUT=k (pieces only),
SPMD_MOE_EP_LOCAL_FIRST=0/1/auto and SPMD_MOE_EP_LOCAL_FIRST_TOKENS (local_first),
SPMD_MOE_EP_TRANSPORT=nccl and SPMD_MOE_EP_TIMEOUT_S (_transport).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from spmd_moe.checking import untracked
from spmd_moe.dispatch import _partial_combine as _pc
from spmd_moe.dispatch.all_to_all import _Streams
from spmd_moe.dispatch.base import ExpertsFn
from spmd_moe.dispatch.validate import _header_device
from spmd_moe.errors import DistributedError
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var, unchecked_cast

if TYPE_CHECKING:
    from spmd_moe.dispatch.all_to_all import AllToAllDispatcher


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


def check_equal_tokens(disp: AllToAllDispatcher, T: int) -> None:
    """Debug mode (where the fixed-size path is not taken; a host read is fine): the
    promise behind ``equal_tokens``, every rank the same T, checked on every call. With
    debug off a broken promise would leave the fixed-size exchange waiting for rows
    that never come (NCCL hangs); here every rank raises, naming the counts."""
    pctx = disp.pctx
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


def fixed_plan(
    disp: AllToAllDispatcher, expert_ids_TK: Int[Placed[Var[EP]], "T K"]
) -> tuple[Int[Placed[Var[EP]], " N"], Int[Placed[Var[EP]], "T n"]]:
    """The send buffer of the fixed-size exchange, on the device only: segment j (T
    rows, N = n*T in all) holds the tokens going to rank j packed at its start, in
    token order (a rank gets each token at most once, so T rows always suffice).
    Returns each buffer row's token (T: no token, the rows past the segment's count)
    and, per token and rank, its row in the buffer (-1: not sent there)."""
    n, e = disp.pctx.size, disp.num_local
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


def fixed_expert_order(
    disp: AllToAllDispatcher, recv_ids_NK: Int[Placed[Var[EP]], "N K"]
) -> tuple[Int[Placed[Var[EP]], " M"], Int[Placed[Var[EP]], " e"]]:
    """The received slots (into N*K) in expert-major order, cut to M = N*min(K, e)
    (no token has more local slots): the first sum(counts_e) are this rank's
    experts' (source rank, then token order within an expert, as on the split-size
    path), the rest belong to no local expert. And the rows per local expert."""
    e, N, K = disp.num_local, recv_ids_NK.shape[0], recv_ids_NK.shape[1]
    local_NK = recv_ids_NK - disp.start
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


def weighted_fixed(
    disp: AllToAllDispatcher,
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
    if disp.chunks > 1 and not torch.is_grad_enabled():
        return weighted_fixed_pieces(disp, x_TD, expert_ids_TK, weights_TK, experts)
    if disp.pctx.size > 1 and not _records_grad(x_TD, weights_TK) and local_first(x_TD.shape[0], x_TD.device):
        return weighted_fixed_local_first(disp, x_TD, expert_ids_TK, weights_TK, experts)
    tok_N, pos_Tn = fixed_plan(disp, expert_ids_TK)
    if _gathers_rows(experts, x_TD, weights_TK):
        # Inference where the experts read the received rows through the slots (no
        # expanded copy, no autograd Functions): the same exchanges and sums.
        recv_ND, recv_meta_NM = _exchange_out(disp, x_TD, weights_TK, expert_ids_TK, tok_N)
        out_MD, recv_w_NK, row_of_slot_X = _experts_on_received(disp, experts, recv_ND, *_ids_w(recv_meta_NM))
        y_TD = _exchange_back(disp.pctx, out_MD, row_of_slot_X, recv_w_NK, pos_Tn, x_TD.dtype)
    else:
        routed_MD, recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R = _FixedDispatch.apply(  # type: ignore[no-untyped-call]
            x_TD, weights_TK, expert_ids_TK, disp, tok_N, pos_Tn)
        out_MD = _experts_bounded(experts, routed_MD, counts_e, rows_R)
        y_TD = _FixedCombine.apply(out_MD, recv_w_NK, row_of_slot_X, order_M, rows_R, pos_Tn, tok_N, disp.pctx,  # type: ignore[no-untyped-call]
                                   x_TD.dtype)
    return unchecked_cast(Placed[Var[EP]], y_TD, reason="this rank's tokens' routed output")


def local_first(T: int, dev: torch.device) -> bool:
    """Whether inference runs weighted_fixed_local_first (else one exchange of every
    segment, this rank's own too, then all the GEMMs). SPMD_MOE_EP_LOCAL_FIRST=1 / 0
    forces it; 'auto' (default): from SPMD_MOE_EP_LOCAL_FIRST_TOKENS (default 8192)
    tokens per rank, or inside a CUDA graph capture. Why: local first issues about half
    as many launches again (two expert calls, the transport's flags); below a few
    thousand tokens the eager forward is bound by the host's issue time, and there one
    exchange was faster (H200 x2, per-GPU throughput against one GPU: all segments 0.54,
    local first 0.42 at 4096 tokens per rank; local first 0.84 against 0.75 at 8192, 0.88
    against 0.76 at 16384; docs/performance.md). A captured graph has no issue time."""
    mode = os.environ.get("SPMD_MOE_EP_LOCAL_FIRST", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    return T >= int(os.environ.get("SPMD_MOE_EP_LOCAL_FIRST_TOKENS", "8192"))


def _records_grad(x_TD: torch.Tensor, weights_TK: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x_TD.requires_grad or weights_TK.requires_grad)


def weighted_fixed_local_first(
    disp: AllToAllDispatcher,
    x_TD: Float[Placed[Var[EP]], "T D"],
    expert_ids_TK: Int[Placed[Var[EP]], "T K"],
    weights_TK: Float[Placed[Var[EP]], "T K"],
    experts: ExpertsFn,
) -> Float[Placed[Var[EP]], "T D"]:
    """Inference, one piece, with the exchanges under the GEMMs: this rank's own tokens
    never travel, so their up projection runs while the peers' tokens arrive, then the
    peers' tokens' experts, then the own tokens' down projection while the partial sums
    go back (a transport from spmd_moe.dispatch._transport: copy engines where they
    apply, else the all-to-all on the side stream). The same sums as weighted_fixed: per
    (token, rank) the fp32 partial over its local slots in ascending k, summed in rank
    order and rounded once (bitwise where the GEMMs give the same rows)."""
    from spmd_moe.dispatch import _transport

    T, K = expert_ids_TK.shape
    pctx, dev, D = disp.pctx, x_TD.device, x_TD.shape[-1]
    n, r = pctx.size, pctx.rank
    ret = return_dtype(x_TD.dtype)
    tok_N, pos_Tn = fixed_plan(disp, expert_ids_TK)
    # The peers' segments in rank order (slices: an index list would be a host-to-device copy).
    tok_O = torch.cat([tok_N[:r * T], tok_N[(r + 1) * T:]]) if 0 < r < n - 1 else tok_N[T:] if r == 0 else tok_N[:r * T]
    st = _Streams(dev, overlap=True)
    tr = _transport.transport(pctx, st, T, D, K, x_TD.dtype, ret, dev)
    tr.send_out(*_fixed_send(disp, x_TD, weights_TK, expert_ids_TK, tok_O))
    own_down, own_w_TK, own_row_of_slot_X = _experts_staged(disp, experts, x_TD, expert_ids_TK, weights_TK)
    recv_ND, recv_meta_NM = tr.recv_out()
    out_MD, recv_w_NK, row_of_slot_X = _experts_on_received(disp, experts, recv_ND, *_ids_w(recv_meta_NM))
    part_RD = _pc.partial_sums_mapped(out_MD, row_of_slot_X, recv_w_NK, out_dtype=ret)
    tr.send_back(part_RD)
    parts_ND = tr.parts()
    # My own tokens' partial sums into my own segment, in token order.
    _pc.partial_sums_mapped(own_down(), own_row_of_slot_X, own_w_TK, out_dtype=ret, out=parts_ND[r * T:(r + 1) * T])
    tr.recv_back(parts_ND)
    t_T = torch.arange(T, device=dev)
    pos_Tn[:, r] = torch.where(pos_Tn[:, r] >= 0, r * T + t_T, -1)  # my own column: the token itself
    y_TD = _pc.sum_over_ranks_at(parts_ND, pos_Tn, x_TD.dtype)
    tr.join()
    return unchecked_cast(Placed[Var[EP]], y_TD, reason="this rank's tokens' routed output")


def weighted_fixed_pieces(
    disp: AllToAllDispatcher,
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
    pctx, dev = disp.pctx, x_TD.device
    bounds = [T * c // disp.chunks for c in range(disp.chunks + 1)]
    st = _Streams(dev, overlap=True)
    y_TD = torch.empty(T, x_TD.shape[-1], dtype=x_TD.dtype, device=dev)
    pieces = []
    for t0, t1 in zip(bounds, bounds[1:]):
        tok_N, pos_Tn = fixed_plan(disp, unchecked_cast(Placed[Var[EP]], expert_ids_TK[t0:t1], reason="a piece of this rank's tokens"))
        send = _fixed_send(disp, x_TD[t0:t1], weights_TK[t0:t1], expert_ids_TK[t0:t1], tok_N)
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
        with _sm_carveout(dev):
            out_MD, recv_w_NK, row_of_slot_X = _experts_on_received(disp, experts, recv_ND, *_ids_w(recv_meta_NM))
        part_ND = _pc.partial_sums_mapped(out_MD, row_of_slot_X, recv_w_NK, out_dtype=return_dtype(x_TD.dtype))
        st.comm_wait(st.main_mark(), part_ND)
        with st.comm_ctx():
            backs.append((_a2a_equal(pctx, part_ND, t1 - t0), st.mark()))
    for (t0, t1, pos_Tn, _), (back_ND, ev) in zip(pieces, backs):
        st.use(ev, back_ND)
        _pc.sum_over_ranks_at(back_ND, pos_Tn, x_TD.dtype, out=y_TD[t0:t1])
    return unchecked_cast(Placed[Var[EP]], y_TD, reason="this rank's tokens' routed output")


def _a2a_equal(pctx: ParallelContext[EP], x: torch.Tensor, rows: int) -> torch.Tensor:
    """The fixed-size exchange: ``rows`` rows of dim 0 to and from every rank (bytes only)."""
    if pctx.size == 1:
        return x
    return pctx.backend.all_to_all(x.contiguous(), [rows] * pctx.size, [rows] * pctx.size)


def _gathers_rows(experts: ExpertsFn, x_TD: torch.Tensor, weights_TK: torch.Tensor) -> bool:
    """Whether inference runs the experts' gather-fused up projection on the received rows
    (GroupedExperts.forward_slots: CUDA, kernels='fast', no autograd recording)."""
    from spmd_moe import experts as _ex

    if _records_grad(x_TD, weights_TK):
        return False
    return isinstance(experts, _ex.GroupedExperts) and _pc.use_kernel(x_TD) and experts.gathers_rows(x_TD)


def _experts_on_received(
    disp: AllToAllDispatcher, experts: ExpertsFn, recv_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference: the experts' rows [M, D] for the received tokens (their expert ids and
    gate values [N, K], any dtype, rows contiguous), their gate values [N, K] in fp32 and
    the slot -> row map (_experts_staged, both stages at once)."""
    down, w32_NK, row_of_slot_X = _experts_staged(disp, experts, recv_ND, ids_NK, w_NK)
    return down(), w32_NK, row_of_slot_X


def _experts_staged(
    disp: AllToAllDispatcher, experts: ExpertsFn, recv_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor,
) -> tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]:
    """_experts_on_received in two stages: the plan and the up projection now, the down
    projection when the returned function is called (so that local first can run this
    rank's own up projection under the way out and its down projection under the way
    back). Where the gather-fused projection applies, its GEMMs read the received rows
    through the slot order (no [M, D] copy); else the count-bounded gather and the grouped
    GEMMs (_experts_bounded_staged)."""
    from spmd_moe import experts as _ex

    if isinstance(experts, _ex.GroupedExperts) and experts.gathers_rows(recv_ND):
        recv_w_NK, counts_e, row_of_slot_X, order_M, _ = _fixed_slots(disp, ids_NK, w_NK)
        c = unchecked_cast(Placed[Var[EP]], counts_e, reason="rows per local expert")
        h_MF = experts.up_slots(
            unchecked_cast(Placed[Var[EP]], recv_ND, reason="the tokens this rank received"),
            unchecked_cast(Placed[Var[EP]], order_M, reason="slots of this rank's experts first"), c, ids_NK.shape[1])
        w2 = experts.w2_EDF
        return (lambda: _ex.grouped_mm(h_MF, w2, c, zero_tail=False)), recv_w_NK, row_of_slot_X
    routed_MD, recv_w_NK, counts_e, row_of_slot_X, _, rows_R = _fixed_expand(disp, recv_ND, ids_NK, w_NK)
    return _experts_bounded_staged(experts, routed_MD, counts_e, rows_R), recv_w_NK, row_of_slot_X


def _experts_bounded(
    experts: ExpertsFn, routed_MD: torch.Tensor, counts_e: torch.Tensor, rows_1: torch.Tensor
) -> torch.Tensor:
    """experts(routed_MD, counts_e, rows_exact=True) where the fused SwiGLU would run over
    all M worst-case rows: _experts_bounded_staged, both stages at once."""
    return _experts_bounded_staged(experts, routed_MD, counts_e, rows_1)()


def _experts_bounded_staged(
    experts: ExpertsFn, routed_MD: torch.Tensor, counts_e: torch.Tensor, rows_1: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """experts(routed_MD, counts_e, rows_exact=True) where the fused SwiGLU would run over
    all M worst-case rows (2x the real rows at n=2, K=8, E=128; 4x at n=4): the same
    three grouped GEMMs (device offsets: they stop at the last one) with a SwiGLU that
    stops at the device row count (the same arithmetic, so the same bits on those rows);
    the up projection now, the down one when the returned function is called. Anything
    else (another experts module, an expert dtype cast, no fused kernels) runs
    ``experts`` itself, now."""
    from spmd_moe import experts as _ex
    from spmd_moe.kernels import fused_bwd as _fb

    def plain() -> Callable[[], torch.Tensor]:
        out = experts(unchecked_cast(Placed[Var[EP]], routed_MD, reason="this rank's expert-major rows"),
                      unchecked_cast(Placed[Var[EP]], counts_e, reason="rows per local expert"), True)
        return lambda: out

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
    return lambda: _ex.grouped_mm(h_MF, w2, c, zero_tail=False, offs_e=offs)


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


def _exchange_out(
    disp: AllToAllDispatcher, x_TD: torch.Tensor, w_TK: torch.Tensor, ids_TK: torch.Tensor, tok_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The way out: the send buffers (_fixed_send), T rows to and from every rank."""
    T = ids_TK.shape[0]
    send_ND, send_meta_NM = _fixed_send(disp, x_TD, w_TK, ids_TK, tok_N)
    return _a2a_equal(disp.pctx, send_ND, T), _a2a_equal(disp.pctx, send_meta_NM, T)


def _exchange_back(
    pctx: ParallelContext[EP], out_MD: torch.Tensor, row_of_slot_X: torch.Tensor, w_NK: torch.Tensor,
    pos_Tn: torch.Tensor, y_dtype: torch.dtype,
) -> torch.Tensor:
    """The way back: the expert rank's partial sum per received token, T rows to and from
    every rank, the sender's sum over ranks in rank order (one rounding)."""
    part_ND = _pc.partial_sums_mapped(out_MD, row_of_slot_X, w_NK, out_dtype=return_dtype(y_dtype))
    return _pc.sum_over_ranks_at(_a2a_equal(pctx, part_ND, pos_Tn.shape[0]), pos_Tn, y_dtype)


def _fixed_expand(
    disp: AllToAllDispatcher, recv_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Received tokens -> expert-major rows [M, D] (M a multiple of 8 >= N*min(K, e)),
    with the received gate values [N, K], rows per local expert, the slot -> row map
    (-1: no row here), the slot order and the device row count R (rows past it: left
    undefined, nothing reads them)."""
    recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R = _fixed_slots(disp, ids_NK, w_NK)
    routed_MD = _pc.gather_rows(recv_ND, order_M, recv_w_NK.shape[1], rows_R)
    return routed_MD, recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R


def _ids_w(meta_NM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exchanged [N, 2K] fp32 rows as (expert ids, gate values) views."""
    K = meta_NM.shape[1] // 2
    return meta_NM[:, :K], meta_NM[:, K:]


def _fixed_slots(disp: AllToAllDispatcher, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """_fixed_expand without the gather: the gate values [N, K] in fp32, rows per local
    expert, the slot -> row map (-1: no row here), the slot order (padded to a multiple
    of 8; past R: any slot, never read) and the device row count R. On CUDA one counting
    sort in two kernels (_pc.slot_plan, the same values up to R)."""
    planned = _pc.slot_plan(ids_NK, w_NK, disp.start, disp.num_local)
    if planned is not None:
        return planned
    K = ids_NK.shape[1]
    dev = ids_NK.device
    order_M, counts_e = fixed_expert_order(disp,
        unchecked_cast(Placed[Var[EP]], ids_NK.to(torch.int64), reason="ids of the received tokens"))
    rows_R = counts_e.sum().view(1)  # device count: rows past it belong to no local expert
    N, M = ids_NK.shape[0], order_M.shape[0]
    ar_M = torch.arange(M, device=dev)
    row_of_slot_X = torch.full((N * K,), -1, dtype=torch.int64, device=dev)
    row_of_slot_X.scatter_(0, order_M, torch.where(ar_M < rows_R, ar_M, -1))
    # A multiple of 8 rows: the CUDA weight-gradient GEMM needs 16-byte rows (else a
    # per-expert loop with a host read). The extra rows are past the count: not written.
    order_M = F.pad(order_M, (0, -M % 8))
    return w_NK.float().contiguous(), counts_e, row_of_slot_X, order_M, rows_R


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
        recv_ND, recv_meta_NM = _exchange_out(disp, x_TD, w_TK, ids_TK, tok_N)
        routed_MD, recv_w_NK, counts_e, row_of_slot_X, order_M, rows_R = _fixed_expand(disp, recv_ND, *_ids_w(recv_meta_NM))
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
        y_TD = _exchange_back(pctx, out_MD, row_of_slot_X, w_NK, pos_Tn, y_dtype)
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
