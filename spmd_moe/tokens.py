"""Token layout: how a layer's [T, D] input sits on the expert axis, and padding.

* ``replicated`` / ``invariant``: every rank holds the same T tokens (Rep). They are
  padded to a multiple of n and split: rank r routes rows [r*T/n, (r+1)*T/n) (Var);
  the outputs are all-gathered back (Rep) and the pad rows sliced off.
* ``sequence``: each rank holds its own slice (Var); slice sizes may differ. The
  all-gather paths (decode dispatcher, shared experts) need equal slices: each is
  padded to the largest.

Pad rows are never routed, never counted (MoE gives them expert id E) and sliced off.
Padding happens only where MoEConfig.padding says 'pad': not told (None) or 'error',
a layer that would need it raises PaddingError on every rank (every rank sees the same
sizes, so all take the same branch).

The peer header (spmd_moe.dispatch.validate) is exchanged here, before any data: ranks
that disagree on config, layout or T fail together instead of hanging. It is exchanged
once per layer and token count, not every call (debug mode: every call):

* replicated / invariant: on the first call with each T (all ranks hold the same T, so
  all of them meet a new T together); never inside a CUDA graph capture (it reads the
  result on the host; the eager warm-up before a capture has checked that T). Inside a
  capture, dispatcher 'auto' takes the all-gather path at any T (no host read).
* sequence: on the first call, and on every call whose path needs the other ranks' token
  counts (the all-gather paths pad to the largest slice, and dispatcher 'auto' picks by
  it); with dispatcher 'all_to_all' and no shared experts, only the first call. The
  all-to-all dispatcher's count exchange then carries a small header (E, top_k, D,
  chunks) compared on every call at no extra host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float

from spmd_moe import _debug
from spmd_moe import collectives as C
from spmd_moe.checking import untracked
from spmd_moe.config import MoEConfig
from spmd_moe.dispatch.validate import exchange_header
from spmd_moe.errors import DistributedError, PaddingError
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Rep, Var



_MAX_CHECKED = 4096  # distinct token counts remembered per layer (then checked afresh)


def _capturing() -> bool:
    """Inside a CUDA graph capture, where a host read of a device value is illegal."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ReplicatedSplit(NamedTuple):
    """The replicated tokens padded to T_pad = a multiple of n, and this rank's chunk."""

    x_all_TD: Float[Placed[Rep[EP]], "T_pad D"]  # the shared experts' input
    x_TD: Float[Placed[Var[EP]], "T_loc D"]  # this rank's chunk: what it routes
    num_pad: int  # pad rows at the end of x_TD
    decode: bool  # all-gather dispatch


class SequenceSlice(NamedTuple):
    """This rank's slice, padded to the largest slice where the all-gather paths need it."""

    x_TD: Float[Placed[Var[EP]], "T_eq D"]
    num_pad: int
    decode: bool


class TokenLayout:
    """The token layout of one MoE layer (``layout``: 'replicated', 'invariant' or
    'sequence'; the first two share the replicated token split)."""

    def __init__(self, cfg: MoEConfig, pctx: ParallelContext[EP], layout: str, name: str) -> None:
        self.cfg = cfg
        self.pctx = pctx
        self.layout = layout
        self.name = name
        self.peers_checked = False
        self._checked_T: set[int] = set()  # replicated: token counts already checked

    def use_decode(self, tokens_per_rank: int) -> bool:
        """The all-gather dispatcher (decode: no host sync) or the all-to-all one."""
        if self.pctx.size == 1:
            return False
        if self.cfg.dispatcher == "auto":
            # Inside a CUDA graph capture (every rank captures the same step), at any T:
            # the all-to-all path reads split sizes on the host, which a capture cannot;
            # the all-gather path computes the same bits with none.
            return tokens_per_rank <= self.cfg.decode_max_tokens or _capturing()
        return self.cfg.dispatcher == "all_gather"

    # ------------------------------------------------------------ replicated / invariant
    def split(self, x_TD: Float[Placed[Rep[EP]], "T D"]) -> ReplicatedSplit:
        """Pad T to a multiple of n (if allowed) and keep this rank's chunk (R -> V)."""
        n, T = self.pctx.size, x_TD.shape[0]
        T_pad = -(-T // n) * n
        T_loc = T_pad // n
        decode = self.use_decode(T_loc)
        if n > 1 and (_debug._enabled or (T not in self._checked_T and not _capturing())):
            # Before any raise or data exchange: once per T (every call in debug mode).
            self.check_peers(T)
            if len(self._checked_T) >= _MAX_CHECKED:
                self._checked_T.clear()
            self._checked_T.add(T)
        x_all_TD = x_TD
        if T_pad > T:
            self.require_padding(f"token count T={T}", f"remainder {T % n}", T_pad)
            x_all_TD = F.pad(x_TD, (0, 0, 0, T_pad - T))  # zero rows appended: still Rep
        num_pad = max(0, min(T_loc, (self.pctx.rank + 1) * T_loc - T))
        return ReplicatedSplit(x_all_TD, C.split_tokens(x_all_TD, self.pctx), num_pad, decode)

    def gather(self, y_TD: Float[Placed[Var[EP]], "T_loc D"], T: int) -> Float[Placed[Rep[EP]], "T D"]:
        """Every rank's chunk (V -> R), pad rows sliced off."""
        y_all_TD = C.all_gather(y_TD, self.pctx)
        return y_all_TD[:T] if y_all_TD.shape[0] > T else y_all_TD

    # ------------------------------------------------------------ sequence
    def equalize(self, x_TD: Float[Placed[Var[EP]], "T D"], *, needs_equal: bool) -> SequenceSlice:
        """Exchange the per-rank counts; pad to the largest where the all-gather paths
        need equal slices (decode dispatch, or ``needs_equal``: the shared experts)."""
        T = x_TD.shape[0]
        if self.pctx.size == 1:
            return SequenceSlice(x_TD, 0, False)
        if self.peers_checked and not _debug._enabled and not needs_equal and self.cfg.dispatcher == "all_to_all":
            # Config agreed on the first call; nothing here depends on the others' counts.
            return SequenceSlice(x_TD, 0, False)
        if self.peers_checked and not _debug._enabled and self.cfg.ep_equal_tokens:
            # Every rank has T tokens (the caller's promise, checked in debug mode): no
            # count exchange, so no host read before the fixed-size exchange.
            return SequenceSlice(x_TD, 0, self.use_decode(T))
        counts = self.check_peers(-1, local_tokens=T)
        if self.cfg.ep_equal_tokens and len(set(counts)) > 1:
            raise DistributedError(
                f"{self.name}: MoEConfig.ep_equal_tokens on axis '{self.pctx.name}': expected every "
                f"rank to pass the same token count, got {counts} (rank {self.pctx.rank}: {T}). "
                "Fix: give every rank the same number of tokens (pad them), or build the layer "
                "with ep_equal_tokens=False."
            )
        decode = self.use_decode(max(counts))
        T_eq = T
        if (decode or needs_equal) and len(set(counts)) > 1:
            self.require_padding(f"per-rank token counts {counts}", "unequal counts", max(counts))
            T_eq = max(counts)
        if T_eq == T:
            return SequenceSlice(x_TD, 0, decode)
        x_eq_TD = F.pad(x_TD, (0, 0, 0, T_eq - T))  # zero rows appended: still Var
        return SequenceSlice(x_eq_TD, T_eq - T, decode)

    # ------------------------------------------------------------ checks
    def check_entry(self, T: int) -> None:
        """The header check for an input of T rows in this layout (debug mode runs it at
        entry, before the input's stated placement is verified from its values)."""
        if self.layout == "sequence":
            self.check_peers(-1, local_tokens=T)
        else:
            self.check_peers(T)

    def check_peers(self, token_convention: int, local_tokens: int = -1) -> list[int]:
        """The header check (see dispatch.validate); returns every rank's local_tokens."""
        cfg = self.cfg
        with untracked():  # metadata, not placed data
            counts = exchange_header(
                self.pctx, num_experts=cfg.num_experts, top_k=cfg.top_k, dim=cfg.dim,
                fingerprint=cfg.fingerprint(), token_convention=token_convention,
                layout=self.layout, what=self.name, local_tokens=local_tokens,
            )
        self.peers_checked = True
        return counts

    def require_padding(self, what: str, got: str, padded: int) -> None:
        """Return if MoEConfig.padding is 'pad'; else raise PaddingError offering both
        choices (let the layer pad, or make the sizes fit)."""
        policy = self.cfg.padding
        if policy == "pad":
            return
        n = self.pctx.size
        if self.layout == "sequence":
            need = "equal per-rank token counts (the all-gather paths need them)"
            fix = f"pad every rank's slice to {padded} rows yourself"
        else:
            need = f"a multiple of the axis size n={n}"
            fix = f"pad the batch to T={padded} rows yourself"
        where = f"{self.name}: {what} on axis '{self.pctx.name}' (size {n}, layout '{self.layout}')"
        let_pad = (
            f"build the layer with MoEConfig(padding='pad') to let it pad to {padded} rows "
            "and slice off the pad rows (never routed, never counted)"
        )
        if policy == "error":
            raise PaddingError(f"{where}: expected {need}, got {got}. Fix: {fix}, or {let_pad}.")
        raise PaddingError(
            f"{where}: expected {need}, got {got}, and MoEConfig.padding is not set (None), so "
            f"the layer may not pad. Fix: either {let_pad}, or {fix} (and set "
            "MoEConfig(padding='error') to refuse such counts explicitly)."
        )
