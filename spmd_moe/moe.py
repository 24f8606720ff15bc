"""MoE: router -> dispatch -> experts -> combine -> shared experts -> output layout.

Shape suffixes (torchtitan's legend): T tokens, D model dim, F expert hidden dim,
E experts, e = E/n local experts, K top-k, R rows routed to this rank, n the size of
the expert axis. Placements are on the expert axis (see spmd_moe.placement):

    x_TD            Rep ('replicated', vLLM) | Inv ('invariant', Megatron-style TP)
                    | Var ('sequence', SP training)
    token layout    spmd_moe.tokens: Inv -> Rep at entry; Rep padded to a multiple of n
                    and split -> Var; Var slices padded to equal size where needed
    router          Var -> weights_TK, expert_ids_TK, scores_TE: Var
    counts_E        Var data, Partial meaning (sum over ranks = global counts)
    dispatch        all_to_all (prefill) | all_gather (decode, no host sync) | local (n=1)
    experts         Var rows, Var (sharded) weights -> Var rows
    combine         slots_TKD: Var; weighted sum over k in ascending expert order -> Var
    shared experts  Rep -> Par (TP-sharded), reduce_scatter -> Var, added
    output layout   all_gather Var -> Rep ('replicated'; then Rep -> Inv for
                    'invariant') | keep Var ('sequence')
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
import contextlib
from contextlib import AbstractContextManager
from typing import Any, Generic, Literal, TypeVar, overload

from typing_extensions import TypeVar as DefaultTypeVar

import spmd_types as spmd
import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import nn

from spmd_moe import _debug
from spmd_moe import _fused_combine as _fc
from spmd_moe.kernels import decode as _dk
from spmd_moe.kernels import fused_bwd as _fb
from spmd_moe import batch_invariant as _bi
from spmd_moe import collectives as C
from spmd_moe import replicated_decode as _rd
from spmd_moe.checking import checked, kernels_agree, tracked_region, untracked
from spmd_moe.config import MoEConfig
from spmd_moe.dispatch import AllGatherDispatcher, AllToAllDispatcher, Dispatcher, LocalDispatcher
from spmd_moe.dispatch.base import SentRows, count_ids, scatter_to_slots
from spmd_moe.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    DistributedError,
    DtypeError,
    RoutingError,
    ShapeError,
    SpmdMoeError,
)
from spmd_moe.experts import GroupedExperts, SharedExperts
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Inv, Par, Placed, Rep, Var, as_inv, as_par, as_rep, as_var, unchecked_cast
from spmd_moe.router import TopKRouter
from spmd_moe.tokens import TokenLayout

Layout = Literal["replicated", "invariant", "sequence"]
LAYOUTS: tuple[Layout, ...] = ("replicated", "invariant", "sequence")


# Layout markers: MoE[Replicated] takes and returns Placed[Rep[EP]], and so on; the
# layout string given to MoE(...) picks the marker statically (see MoE.__init__).
class Replicated:
    """Layout 'replicated': Rep in, Rep out (the input's gradient is Partial)."""


class Invariant:
    """Layout 'invariant': Inv in, Inv out (complete input gradient on every rank)."""


class Sequence:
    """Layout 'sequence': Var in (this rank's token slice), Var out."""


class AnyLayout:
    """A layout chosen at runtime (a plain str): forward takes and returns plain tensors
    and states the layout's placement at entry (verified in debug mode)."""


# A bare ``MoE`` (a layer whose layout is chosen at runtime) is MoE[AnyLayout].
L = DefaultTypeVar("L", Replicated, Invariant, Sequence, AnyLayout, default=AnyLayout)
_S = TypeVar("_S")


class RoutedExperts(nn.Module):
    """Holds the local experts under torchtitan's key path (routed_experts.inner_experts)."""

    def __init__(self, cfg: MoEConfig, pctx: ParallelContext[EP], device: torch.device | None):
        super().__init__()
        self.inner_experts = GroupedExperts(cfg, pctx, device)


class MoE(nn.Module, Generic[L]):
    """One MoE layer on the expert axis ``pctx`` (None: one device).

    ``layout`` says how the tokens sit on the axis: 'replicated' (every rank the same
    tokens; vLLM), 'invariant' (the same, with complete gradients on every rank;
    Megatron-style TP) or 'sequence' (each rank its own slice; sequence-parallel
    training). ``moe(x_TD)`` is typed per layout: ``MoE(cfg, pctx, layout="sequence")``
    is a ``MoE[Sequence]`` whose call takes and returns ``Placed[Var[EP]]``.
    """

    @overload
    def __init__(
        self: MoE[Replicated], cfg: MoEConfig, pctx: ParallelContext[EP] | None = None, *,
        layout: Literal["replicated"] = "replicated", device: torch.device | str | None = None, name: str = "moe",
    ) -> None: ...

    @overload
    def __init__(
        self: MoE[Invariant], cfg: MoEConfig, pctx: ParallelContext[EP] | None = None, *,
        layout: Literal["invariant"], device: torch.device | str | None = None, name: str = "moe",
    ) -> None: ...

    @overload
    def __init__(
        self: MoE[Sequence], cfg: MoEConfig, pctx: ParallelContext[EP] | None = None, *,
        layout: Literal["sequence"], device: torch.device | str | None = None, name: str = "moe",
    ) -> None: ...

    @overload
    def __init__(
        self: MoE[AnyLayout], cfg: MoEConfig, pctx: ParallelContext[EP] | None = None, *,
        layout: str, device: torch.device | str | None = None, name: str = "moe",
    ) -> None: ...

    def __init__(
        self,
        cfg: MoEConfig,
        pctx: ParallelContext[EP] | None = None,
        *,
        layout: str = "replicated",
        device: torch.device | str | None = None,
        name: str = "moe",
    ) -> None:
        super().__init__()
        pctx = pctx or ParallelContext.single()
        cfg.check_ep(pctx.size)
        if layout not in LAYOUTS:
            raise ConfigError(
                f"MoE layout: expected 'replicated', 'invariant' or 'sequence', got {layout!r}. "
                "Fix: 'replicated' when every rank holds the same tokens (vLLM TP; the input "
                "gradient is Partial), 'invariant' for the same tokens with complete gradients "
                "on every rank (Megatron-style TP), 'sequence' when each rank holds its own "
                "token slice (sequence-parallel training)."
            )
        dev = torch.device(device) if device is not None else None
        self.cfg = cfg
        self.pctx = pctx
        self.layout: Layout = layout
        self.name = name
        self.tokens = TokenLayout(cfg, pctx, layout, name)
        self.router = TopKRouter(cfg, pctx, dev)
        self.router.layer_name = f"{name}.router"
        self.routed_experts = RoutedExperts(cfg, pctx, dev)
        self.shared_experts = SharedExperts(cfg, pctx, dev) if cfg.shared_hidden_dim else None
        self.load_balance_coeff = cfg.load_balance_coeff
        self.expert_bias_E: torch.Tensor | None
        if cfg.load_balance_coeff is not None:
            self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts, device=dev), persistent=True)
        else:
            self.expert_bias_E = None
        # Local counts of this rank's tokens: Partial over the expert axis.
        self.tokens_per_expert_E: torch.Tensor
        self.register_buffer("tokens_per_expert_E", torch.zeros(cfg.num_experts, device=dev), persistent=False)
        self.prefill_dispatcher: Dispatcher[Any]
        self.decode_dispatcher: Dispatcher[Any]
        if pctx.size == 1:
            self.prefill_dispatcher = self.decode_dispatcher = LocalDispatcher(cfg.num_experts, pctx)
        else:
            a2a = AllToAllDispatcher(cfg.num_experts, pctx, chunks=cfg.ep_chunks, partial_return=cfg.kernels == "fast")
            # Equal per-rank token counts (the replicated layouts' chunks; 'sequence' where the
            # caller promises them): the fixed-size exchange, with no host read.
            a2a.equal_tokens = layout != "sequence" or cfg.ep_equal_tokens
            self.prefill_dispatcher = a2a
            self.decode_dispatcher = AllGatherDispatcher(cfg.num_experts, pctx)
        # Routing replay: record each call's expert ids, or force them.
        self.record_routes = False
        self.recorded_routes: list[torch.Tensor] = []
        self.forced_routes_TK: torch.Tensor | None = None

    @property
    def experts(self) -> GroupedExperts:
        return self.routed_experts.inner_experts

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """nn.Module.load_state_dict, with strict key and shape checks that raise
        CheckpointError naming the first bad key (this rank's shard shapes)."""
        if strict:
            want = {k: tuple(v.shape) for k, v in self.state_dict().items()}
            for k in sorted(set(state_dict) - set(want)):
                raise CheckpointError(
                    f"{self.name}: state dict key '{k}': unexpected (expected keys: "
                    f"{sorted(want)}). Fix: drop it, strip the parent module's prefix, or "
                    "build the layer with the config the checkpoint was saved with."
                )
            for k in sorted(set(want) - set(state_dict)):
                raise CheckpointError(
                    f"{self.name}: state dict key '{k}': missing (expected shape {want[k]}). "
                    "Fix: load a checkpoint saved from a model with this MoEConfig."
                )
        for k, shape in ((k, tuple(v.shape)) for k, v in self.state_dict().items()):
            got = state_dict.get(k)
            if isinstance(got, torch.Tensor) and tuple(got.shape) != shape:
                hint = (
                    " A full (EP size 1) checkpoint on a rank of an EP group: shard it first "
                    "with spmd_moe.checkpoint.shard_state_dict(sd, cfg, pctx)."
                    if self.pctx.size > 1 and got.ndim == len(shape) and got.shape[0] == self.pctx.size * shape[0]
                    else " Check dim / hidden_dim / num_experts of the MoEConfig against the checkpoint."
                )
                raise CheckpointError(
                    f"{self.name}: state dict key '{k}' on axis '{self.pctx.name}' (size "
                    f"{self.pctx.size}): expected shape {shape}, got {tuple(got.shape)}. Fix:{hint}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ forward
    @overload
    def forward(self: MoE[Replicated], x_TD: Float[Placed[Rep[EP]], "T D"]) -> Float[Placed[Rep[EP]], "T D"]: ...

    @overload
    def forward(self: MoE[Invariant], x_TD: Float[Placed[Inv[EP]], "T D"]) -> Float[Placed[Inv[EP]], "T D"]: ...

    @overload
    def forward(self: MoE[Sequence], x_TD: Float[Placed[Var[EP]], "T D"]) -> Float[Placed[Var[EP]], "T D"]: ...

    @overload
    def forward(self: MoE[AnyLayout], x_TD: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [T, D] in the layer's layout (see the module docstring)."""
        self._check_input(x_TD)
        # One memory layout for every caller: a strided or transposed view computes
        # (and back-propagates) bit for bit as its contiguous copy, whatever kernels
        # the CPU's BLAS picks per layout. A no-op on contiguous input.
        x_TD = x_TD.contiguous()
        if self.pctx.size > 1 and _debug._enabled:
            self._check_finite_everywhere(x_TD)
            # Ranks that disagree (config, layout, T) fail on the header, before the
            # input's stated placement is verified from its values.
            self.tokens.check_entry(x_TD.shape[0])
        try:
            with self._typecheck():
                return self._forward_layout(x_TD)
        except RuntimeError as e:
            if self.pctx.size == 1 or isinstance(e, SpmdMoeError) or not _from_torch_distributed(e):
                raise
            raise DistributedError(
                f"{self.name}: a collective on axis '{self.pctx.name}' (size {self.pctx.size}, "
                f"this rank {self.pctx.rank}) failed mid-forward: expected every rank to take "
                f"part, got: {str(e).splitlines()[0][:300]}. Fix: check the other ranks' logs "
                "(a rank that crashed, was killed or skipped this layer after the metadata "
                "check); the group is unusable now, restart the job."
            ) from e

    def _forward_layout(self, x_TD: torch.Tensor) -> torch.Tensor:
        """State the layout's placement on the input (verified in debug mode) and run it."""
        what = f"{self.name}: x_TD"
        if self.layout == "replicated":
            return self.forward_replicated(as_rep(x_TD, self.pctx, what))
        if self.layout == "invariant":
            return self.forward_invariant(as_inv(x_TD, self.pctx, what))
        return self.forward_sequence(as_var(x_TD, self.pctx, what))

    def _check_finite_everywhere(self, x_TD: torch.Tensor) -> None:
        """Debug mode, >1 rank: every rank learns whether any rank's router input holds
        NaN/inf and all raise together (a lone raise would leave the others hanging)."""
        bad = torch.tensor([int((~torch.isfinite(x_TD)).any(dim=-1).sum())], dtype=torch.int64)
        everyone = torch.empty(self.pctx.size, dtype=torch.int64)
        try:
            dist.all_gather_into_tensor(everyone, bad, group=self.pctx.group)
        except RuntimeError as e:
            raise DistributedError(
                f"{self.name}: debug-mode finite check on axis '{self.pctx.name}' (size "
                f"{self.pctx.size}) failed: expected every rank to join, got: "
                f"{str(e).splitlines()[0][:300]}. Fix: check that every rank reached this MoE "
                "layer, with debug mode on everywhere (a rank that died or skipped the layer "
                "makes the others time out after the group's timeout)."
            ) from e
        if int(everyone.sum()):
            ranks = [r for r in range(self.pctx.size) if int(everyone[r])]
            raise RoutingError(
                f"{self.router.layer_name}: router input x_TD on axis '{self.pctx.name}': "
                f"expected finite values on every rank, got NaN/inf in "
                f"{[int(everyone[r]) for r in ranks]} tokens on ranks {ranks}. Fix: find the "
                "layer before this MoE that produced NaN/inf (check its inputs and the "
                "learning rate)."
            )

    @checked
    def forward_replicated(self, x_TD: Float[Placed[Rep[EP]], "T D"]) -> Float[Placed[Rep[EP]], "T D"]:
        if _rd.applies(self, x_TD.shape[0]):  # inference decode: one all-reduce (bitwise the same)
            return _rd.forward(self, x_TD)
        split = self.tokens.split(x_TD)
        y_TD = self._routed(split.x_TD, split.num_pad, decode=split.decode)
        if self.shared_experts is not None:
            y_TD = y_TD + self._reduce_shared(self.shared_experts(split.x_all_TD))
        return self.tokens.gather(y_TD, x_TD.shape[0])

    @checked
    def forward_invariant(self, x_TD: Float[Placed[Inv[EP]], "T D"]) -> Float[Placed[Inv[EP]], "T D"]:
        # I -> R at entry (backward: the Partial input gradient summed over the axis),
        # R -> I at exit (backward: the complete output gradient taken once).
        y_TD = self.forward_replicated(C.invariant_to_replicate(x_TD, self.pctx))
        return C.replicate_to_invariant(y_TD, self.pctx)

    @checked(tokens=("x_TD",))
    def forward_sequence(self, x_TD: Float[Placed[Var[EP]], "T D"]) -> Float[Placed[Var[EP]], "T D"]:
        local = self.tokens.equalize(x_TD, needs_equal=self.shared_experts is not None)
        y_TD = self._routed(local.x_TD, local.num_pad, decode=local.decode)
        if self.shared_experts is not None:
            x_all_TD = C.all_gather(local.x_TD, self.pctx)
            y_TD = y_TD + self._reduce_shared(self.shared_experts(x_all_TD))
        return y_TD[: x_TD.shape[0]] if local.num_pad else y_TD

    # ------------------------------------------------------------------ pieces
    def _reduce_shared(self, shared_TD: Float[Placed[Par[EP]], "T D"]) -> Float[Placed[Var[EP]], "t D"]:
        """The shared experts' Partial sum, this rank's token chunk (P -> V). In
        batch-invariant mode with more than 2 ranks the summands are added in rank
        order (a+b is exact in any order; a+b+c is not)."""
        if _bi._enabled and self.pctx.size > 2:
            return _bi.ordered_reduce_scatter(shared_TD, self.pctx.group, self.pctx.size, self.pctx.rank)
        return C.reduce_scatter(shared_TD, self.pctx)

    def _routed(self, x_TD: Float[Placed[Var[EP]], "T D"], num_pad: int, *, decode: bool) -> Float[Placed[Var[EP]], "T D"]:
        """Route this rank's rows (the last num_pad are padding), run the experts on
        them and combine: Var -> Var."""
        T = x_TD.shape[0]
        if num_pad == 0 and self._decode_kernel_applies(x_TD):
            return self._routed_decode_kernel(x_TD)
        if num_pad == 0 and _bi._enabled:  # the invariant kernels' decode form, where it applies
            y_dec_TD = _bi.routed_decode(self, x_TD)
            if y_dec_TD is not None:
                return y_dec_TD
        bias_E = self._expert_bias()
        # CUDA inference (kernels='fast', no routing replay): the fast router, whose ids come
        # already ascending per token (spmd_moe.kernels.fast_route).
        replay = self.forced_routes_TK is not None or self.record_routes
        fast = None if replay else self.router.fast_route(x_TD, bias_E)
        if fast is not None:
            weights_TK, expert_ids_TK = fast
        else:
            weights_TK, expert_ids_TK, _ = self.router(x_TD, bias_E)
        if self.forced_routes_TK is not None:
            weights_TK, expert_ids_TK = self._forced(x_TD, expert_ids_TK)
        if self.record_routes:
            # In the router's own k order: replaying them (forced_routes_TK) normalizes the
            # gate values in that order too, so the replay is bitwise for any top_k.
            self.recorded_routes.append(expert_ids_TK[: T - num_pad].detach().clone())
        if num_pad:
            # Pad tokens get expert id E (all K of them: the order stays ascending): sorted
            # last, never sent, never counted.
            pad_mark_TK = torch.arange(T, device=x_TD.device).unsqueeze(1) >= T - num_pad
            expert_ids_TK = torch.where(pad_mark_TK, self.cfg.num_experts, expert_ids_TK)
        if fast is None:
            # Ascending expert id within each token: a fixed summation order for combine.
            expert_ids_TK, k_order_TK = expert_ids_TK.sort(dim=-1)
            weights_TK = permute_k(weights_TK, k_order_TK)
        dispatcher = self.decode_dispatcher if decode else self.prefill_dispatcher
        y_TD, counts_E = self._experts_via(dispatcher, x_TD, expert_ids_TK, weights_TK, num_pad)
        self._count(expert_ids_TK, counts_E)
        return y_TD

    def _decode_kernel_applies(self, x_TD: torch.Tensor) -> bool:
        """spmd_moe.kernels.decode: one GPU, inference, plain top-k routing, debug off."""
        if self.cfg.kernels != "fast" or self.pctx.size != 1 or _debug._enabled or _bi._enabled:
            return False
        if self.forced_routes_TK is not None or self.record_routes or self.cfg.num_expert_groups is not None:
            return False
        if self.cfg.expert_dtype not in (None, x_TD.dtype):
            return False
        return _dk.usable(x_TD, self.experts.w1_EFD)

    def _routed_decode_kernel(self, x_TD: Float[Placed[Var[EP]], "T D"]) -> Float[Placed[Var[EP]], "T D"]:
        ex = self.experts
        y_TD = _dk.routed_decode(
            x_TD, self.router.gate.weight, self._expert_bias(), ex.w1_EFD, ex.w2_EDF, ex.w3_EFD,
            top_k=self.cfg.top_k, score_func=self.cfg.score_func, route_norm=self.cfg.route_norm,
            route_scale=self.cfg.route_scale, tokens_per_expert_E=self.tokens_per_expert_E,
        )
        return unchecked_cast(Placed[Var[EP]], y_TD, reason="one rank: router, experts and combine of its own tokens")

    def _experts_via(
        self,
        dispatcher: Dispatcher[_S],
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_ids_TK: Int[Placed[Var[EP]], "T K"],
        weights_TK: Float[Placed[Var[EP]], "T K"],
        num_pad: int,
    ) -> tuple[Float[Placed[Var[EP]], "T D"], Int[Placed[Var[EP]], " E"] | None]:
        """dispatch -> experts -> combine -> weighted sum over k. Also returns the
        dispatcher's counts of every expert's rows where they cover all E experts (one
        rank), for _count (None: it counts itself)."""
        # A dispatcher that weights on the expert ranks (all_to_all, kernels='fast', CUDA
        # inference: fp32 partial sums travel back) returns the output itself.
        y_TD = dispatcher.weighted(x_TD, expert_ids_TK, weights_TK, num_pad, self.experts)
        if y_TD is not None:
            return y_TD, None
        # A dispatcher that interleaves its exchanges with the expert GEMMs (all_to_all
        # with chunks > 1) runs the experts itself; the others return None here.
        piped = dispatcher.pipelined(x_TD, expert_ids_TK, num_pad, self.experts)
        if piped is not None:
            return self._combine_rows(piped, weights_TK), None
        if isinstance(dispatcher, LocalDispatcher) and self.experts.gathers_rows(x_TD):
            # CUDA inference (kernels='fast'): the up GEMMs read x through the sorted slots
            # (no gathered copy), SwiGLU in their epilogue (spmd_moe.kernels.gather_gemm).
            slots_R, counts_E, local = dispatcher.sorted_slots(expert_ids_TK, num_pad)
            out_RD = self.experts.forward_slots(x_TD, slots_R, counts_E, local.top_k)
            return self._combine_rows(dispatcher.returned_rows(out_RD, local), weights_TK), counts_E
        routed_RD, counts_e, state = dispatcher.dispatch(x_TD, expert_ids_TK, num_pad)
        # One rank: the local experts are all E, counted from the same ids.
        counts_E = counts_e if isinstance(dispatcher, LocalDispatcher) and counts_e.shape[0] == self.cfg.num_experts else None
        out_RD = self.experts(routed_RD, counts_e, rows_exact=dispatcher.rows_exact)
        if _fc.usable(out_RD, weights_TK) or _fb.applies(self.cfg.kernels, out_RD, weights_TK):
            back = dispatcher.returned_rows(out_RD, state)
            if back is not None:
                return self._combine_rows(back, weights_TK), counts_E
        return _weighted_sum(dispatcher.combine(out_RD, state), weights_TK), counts_E

    def _combine_rows(self, back: SentRows, weights_TK: Float[Placed[Var[EP]], "T K"]) -> Float[Placed[Var[EP]], "T D"]:
        """Returned rows -> each slot -> weighted sum over k (fused on CUDA: inference, and
        training with kernels='fast')."""
        T, K = weights_TK.shape
        if _fb.applies(self.cfg.kernels, back.rows_SD, weights_TK):
            # Training on CUDA (kernels='fast'): the same sum, and its backward, one kernel each.
            return _fb.weighted_combine(back.rows_SD, back.slots_S, weights_TK)
        if _fc.usable(back.rows_SD, weights_TK):
            # Inference on CUDA: scatter back, weighting and the ordered sum in one
            # kernel, bitwise equal to combine + _weighted_sum.
            if not _debug._enabled:
                return _fc.weighted_combine(back.rows_SD, back.slots_S, weights_TK)
            # Debug mode: the tracked reference path, compared with the kernel.
            slots_TKD = scatter_to_slots(back.rows_SD, back.slots_S, T * K).view(T, K, back.rows_SD.shape[-1])
            y_TD = _weighted_sum(slots_TKD, weights_TK)
            with untracked():
                fast_TD = _fc.weighted_combine(back.rows_SD, back.slots_S, weights_TK)
            kernels_agree(f"{self.name}: fused combine", fast_TD, y_TD, self.pctx)
            return y_TD
        return _weighted_sum(scatter_to_slots(back.rows_SD, back.slots_S, T * K).view(T, K, back.rows_SD.shape[-1]), weights_TK)

    def _expert_bias(self) -> Float[Placed[Rep[EP]], "E"] | None:
        if self.expert_bias_E is None:
            return None
        return as_rep(self.expert_bias_E, self.pctx, f"{self.name}: expert_bias_E")

    def _forced(
        self, x_TD: Float[Placed[Var[EP]], "T D"], routed_ids_TK: Int[Placed[Var[EP]], "T K"]
    ) -> tuple[Float[Placed[Var[EP]], "T K"], Int[Placed[Var[EP]], "T K"]]:
        """Replace the router's choice by the forced routes (gate values recomputed)."""
        with untracked():  # the user's plain tensor: checked here, stated Varying below
            forced_TK = self._valid_forced_routes(routed_ids_TK)
        ids_TK = as_var(forced_TK, self.pctx, f"{self.name}: forced_routes_TK")
        scores_TE = self.router(x_TD, None)[2]
        weights_TK = scores_TE.gather(-1, ids_TK)
        if self.cfg.route_norm:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * self.cfg.route_scale, ids_TK

    def _valid_forced_routes(self, routed_ids_TK: torch.Tensor) -> torch.Tensor:
        """forced_routes_TK as int64 on the layer's device, or RoutingError."""
        forced = self.forced_routes_TK
        assert forced is not None
        if forced.shape != routed_ids_TK.shape or forced.dtype not in (torch.int64, torch.int32):
            raise RoutingError(
                f"{self.name}: forced_routes_TK: expected an integer tensor of shape "
                f"{tuple(routed_ids_TK.shape)} (this rank's tokens x top_k), got "
                f"{forced.dtype} {tuple(forced.shape)}. Fix: pass the routes recorded for "
                "exactly these tokens."
            )
        if forced.numel() and (int(forced.min()) < 0 or int(forced.max()) >= self.cfg.num_experts):
            raise RoutingError(
                f"{self.name}: forced_routes_TK: expected expert ids in [0, "
                f"{self.cfg.num_experts}), got values in [{int(forced.min())}, "
                f"{int(forced.max())}]. Fix: record routes from a model with the same experts."
            )
        if forced.shape[-1] > 1:
            srt = forced.sort(dim=-1).values
            dup_T = (srt[:, 1:] == srt[:, :-1]).any(dim=-1)
            if bool(dup_T.any()):
                t = int(dup_T.nonzero()[0, 0])
                raise RoutingError(
                    f"{self.name}: forced_routes_TK: expected {forced.shape[-1]} distinct "
                    f"expert ids per token, got {forced[t].tolist()} for token {t}. Fix: "
                    "pass routes recorded by the router (top-k never repeats an expert)."
                )
        return forced.to(routed_ids_TK.device, torch.int64)

    def _count(self, expert_ids_TK: Int[Placed[Var[EP]], "T K"], counts_E: Int[Placed[Var[EP]], " E"] | None = None) -> None:
        """Add the tokens each expert got to the load-balance counter; counts_E: the same
        histogram, already made by the dispatcher (one histogram a call, not two)."""
        # The counter is this rank's bookkeeping (Partial meaning, summed only by
        # global_tokens_per_expert): outside debug mode's tracking.
        with torch.no_grad(), untracked():
            if counts_E is None:
                counts_E = count_ids(expert_ids_TK, self.cfg.num_experts + 1)[: self.cfg.num_experts]  # no host sync
            self.tokens_per_expert_E.add_(counts_E)  # int -> float in the add

    def global_tokens_per_expert(self) -> Float[Placed[Rep[EP]], "E"]:
        """The counters summed over the expert axis (P -> R): global counts per expert."""
        with torch.no_grad():
            local_E = as_par(self.tokens_per_expert_E.clone(), self.pctx, f"{self.name}: tokens_per_expert_E")
            return C.all_reduce(local_E, self.pctx)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """torchtitan's aux-loss-free update: bias += coeff * sign(mean - count), centred."""
        if self.expert_bias_E is None or self.load_balance_coeff is None:
            return
        counts_E = self.global_tokens_per_expert().float()
        delta_E = self.load_balance_coeff * torch.sign(counts_E.mean() - counts_E)
        self.expert_bias_E.add_(delta_E - delta_E.mean())
        self.tokens_per_expert_E.zero_()

    def _check_input(self, x_TD: torch.Tensor) -> None:
        if not isinstance(x_TD, torch.Tensor):
            raise DtypeError(
                f"{self.name}: x_TD: expected a torch.Tensor, got {type(x_TD).__name__}. "
                "Fix: pass hidden states as a [T, D] tensor (torch.as_tensor(x))."
            )
        if x_TD.ndim != 2 or x_TD.shape[-1] != self.cfg.dim:
            raise ShapeError(
                f"{self.name}: x_TD: expected shape [T, D={self.cfg.dim}], got "
                f"{tuple(x_TD.shape)}. Fix: flatten batch and sequence into T "
                "(x.reshape(-1, D)) and check the layer's MoEConfig.dim."
            )
        if x_TD.is_meta:
            raise DeviceError(
                f"{self.name}: x_TD: expected a real tensor, got one on the meta device. "
                "Fix: materialize the inputs (and call to_empty() + init_states() on the layer)."
            )
        w = self.router.gate.weight
        if w.is_meta:
            raise DeviceError(
                f"{self.name}: parameters: expected materialized weights, got meta tensors. "
                "Fix: call moe.to_empty(device=...) then moe.init_states(seed) or load a state dict."
            )
        if x_TD.device != w.device:
            raise DeviceError(
                f"{self.name}: x_TD: expected device {w.device} (the layer's), got "
                f"{x_TD.device}. Fix: x_TD.to({str(w.device)!r}) or move the layer."
            )
        if not x_TD.dtype.is_floating_point:
            raise DtypeError(
                f"{self.name}: x_TD: expected a floating dtype, got {x_TD.dtype}. "
                "Fix: pass hidden states, not token ids."
            )

    def _typecheck(self) -> AbstractContextManager[None]:
        """Debug mode on >1 rank: the layer's tracked region (spmd_types strict mode,
        its own parameters verified and marked for the call, errors as PlacementError)."""
        if not (_debug._enabled and self.pctx.size > 1):
            return contextlib.nullcontext()
        return tracked_region(self.pctx, self.name, self._placed_params())

    def _placed_params(self) -> list[tuple[str, torch.Tensor, str]]:
        """(name, tensor, placement) of the layer's own parameters and buffers: the gate
        and the expert bias Replicate, the expert and shared-expert shards Varying."""
        gate = "I" if self.router.gate_grad == "complete" else "R"
        out: list[tuple[str, torch.Tensor, str]] = [("router.gate.weight", self.router.gate.weight, gate)]
        if self.expert_bias_E is not None:
            out.append(("expert_bias_E", self.expert_bias_E, "R"))
        out += [(f"experts.{k}", p, "V") for k, p in self.experts.named_parameters()]
        if self.shared_experts is not None:
            # The hidden-dim shards are Varying; the optional [1, D] gate is Replicate.
            out += [
                (f"shared_experts.{k}", p, "R" if k == "gate.weight" else "V")
                for k, p in self.shared_experts.named_parameters()
            ]
        return out

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_states(self, seed: int = 0, std: float = 0.02) -> None:
        """Deterministic init from a seed, independent of the EP layout: each expert's
        weights come from a generator seeded by (seed, layer name, param, expert id)."""
        e0, e1 = self.experts.expert_start, self.experts.expert_stop
        for pname in ("w1_EFD", "w2_EDF", "w3_EFD"):
            p = getattr(self.experts, pname)
            for i, e in enumerate(range(e0, e1)):
                p[i].copy_(_seeded_normal(p.shape[1:], (seed, self.name, pname, e), std, p.dtype))
        self.router.gate.weight.copy_(
            _seeded_normal(self.router.gate.weight.shape, (seed, self.name, "gate"), std, self.router.gate.weight.dtype)
        )
        if self.shared_experts is not None:
            se = self.shared_experts
            n, r = self.pctx.size, self.pctx.rank
            for pname in ("w1", "w2", "w3"):
                w = getattr(se, pname).weight
                full_shape = (w.shape[0] * n, w.shape[1]) if pname != "w2" else (w.shape[0], w.shape[1] * n)
                full = _seeded_normal(full_shape, (seed, self.name, "shared", pname), std, w.dtype)
                w.copy_(full.chunk(n, dim=0 if pname != "w2" else 1)[r])
            if se.gate is not None:
                g = se.gate.weight
                g.copy_(_seeded_normal(g.shape, (seed, self.name, "shared", "gate"), std, g.dtype))
        if self.expert_bias_E is not None:
            self.expert_bias_E.zero_()
        self.tokens_per_expert_E.zero_()


def _from_torch_distributed(e: BaseException) -> bool:
    """Whether ``e`` was raised inside torch.distributed (a collective that failed)."""
    if isinstance(e, dist.DistError):
        return True
    tb = e.__traceback__
    while tb is not None:
        if "torch/distributed/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


@spmd.register_local_autograd_function  # a permutation within each row: placements propagate
class _PermuteK(torch.autograd.Function):
    """w.gather(-1, order) for a per-row permutation ``order``, saving for backward only the
    order as uint8 (gather would keep the source and an int64 copy of the order: 12 bytes
    a slot more, which made the layer's peak memory exceed torchtitan's under its Trainer).
    Backward scatters the gradient back: a permutation, exact."""

    @staticmethod
    def forward(ctx: Any, w_TK: torch.Tensor, order_TK: torch.Tensor) -> torch.Tensor:
        small = order_TK.shape[-1] <= 256
        ctx.save_for_backward(order_TK.to(torch.uint8) if small else order_TK)
        return w_TK.gather(-1, order_TK)

    @staticmethod
    def backward(ctx: Any, g_TK: torch.Tensor) -> tuple[torch.Tensor, None]:
        (order_TK,) = ctx.saved_tensors
        return torch.empty_like(g_TK).scatter_(-1, order_TK.long(), g_TK), None


def permute_k(
    weights_TK: Float[Placed[Var[EP]], "T K"], k_order_TK: Int[Placed[Var[EP]], "T K"]
) -> Float[Placed[Var[EP]], "T K"]:
    """The gate values in the k order of the sorted expert ids (see _PermuteK)."""
    if not (torch.is_grad_enabled() and weights_TK.requires_grad):
        return weights_TK.gather(-1, k_order_TK)
    return unchecked_cast(
        Placed[Var[EP]], _PermuteK.apply(weights_TK, k_order_TK),  # type: ignore[no-untyped-call]
        reason="this rank's gate values, permuted within each token",
    )


def _weighted_sum(
    slots_TKD: Float[Placed[Var[EP]], "T K D"], weights_TK: Float[Placed[Var[EP]], "T K"]
) -> Float[Placed[Var[EP]], "T D"]:
    """sum_k w[t,k] * slot[t,k] in ascending k (= ascending expert id), weighting in
    fp32 and rounding each term to the slot dtype first (torchtitan's order)."""
    w_TK1 = weights_TK.float().unsqueeze(-1)
    if slots_TKD.dtype in (torch.bfloat16, torch.float16):
        # bf16 * fp32 promotes to fp32: the same fp32 products, with no fp32 copy of the
        # slots; without autograd, one kernel that also rounds on store.
        if torch.is_grad_enabled() and (slots_TKD.requires_grad or w_TK1.requires_grad):
            terms_TKD = (slots_TKD * w_TK1).to(slots_TKD.dtype)
        else:
            terms_TKD = torch.mul(slots_TKD, w_TK1, out=torch.empty_like(slots_TKD))
    else:
        terms_TKD = (slots_TKD.float() * w_TK1).to(slots_TKD.dtype)
    # unbind, not terms_TKD[:, k]: its backward stacks the K gradients once, where K
    # slice backwards would each zero-fill a [T, K, D] buffer and then add them up.
    terms = terms_TKD.unbind(1)
    acc_TD = terms[0]
    for term_TD in terms[1:]:
        acc_TD = acc_TD + term_TD
    return acc_TD


def _seeded_normal(shape: tuple[int, ...] | torch.Size, key: tuple[object, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * std).to(dtype)
