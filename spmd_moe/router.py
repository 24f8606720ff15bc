"""TopKRouter: token-choice top-k routing, torchtitan 0.3.0 semantics.

Shape suffixes: T tokens, D model dim, E experts, K top-k.
The router runs on this rank's token slice: everything it touches is Varying on the
expert axis, except the gate weight and the expert bias, which are Replicate.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from spmd_moe import _debug
from spmd_moe import batch_invariant as _bi
from spmd_moe.config import MoEConfig
from spmd_moe.errors import RoutingError
from spmd_moe.kernels import fast_route as _fr
from spmd_moe.parallel import ParallelContext
from spmd_moe import collectives as C
from spmd_moe.placement import EP, Placed, Rep, Var, as_inv, as_rep, unchecked_cast
from spmd_moe.checking import checked


GateGrad = Literal["partial", "complete"]


class TopKRouter(nn.Module):
    def __init__(
        self, cfg: MoEConfig, pctx: ParallelContext[EP], device: torch.device | None = None,
        gate_grad: GateGrad = "partial",
    ):
        super().__init__()
        self.cfg = cfg
        self.pctx = pctx
        self.gate = nn.Linear(cfg.dim, cfg.num_experts, bias=False, device=device, dtype=cfg.param_dtype)
        self.layer_name = "moe.router"
        # The gate weight's gradient on the expert axis. Each rank routes its own tokens,
        # so each holds a summand: 'partial' leaves the sum to whoever reduces gradients
        # over this axis (FSDP/DDP when EP is drawn from data parallel); 'complete' states
        # the weight Invariant and enters it with invariant_to_replicate, whose backward
        # all-reduces (TP2EP: no data-parallel reduction covers the TP group).
        self.gate_grad: GateGrad = gate_grad

    def gate_weight(self) -> Float[Placed[Rep[EP]], "E D"]:
        """The gate weight as the routing uses it (Replicate), per ``gate_grad``."""
        name = f"{self.layer_name}.gate.weight"
        if self.gate_grad == "complete":
            return C.invariant_to_replicate(as_inv(self.gate.weight, self.pctx, name), self.pctx)
        return as_rep(self.gate.weight, self.pctx, name)

    def _group_limit(self, scores_TE: Float[Placed[Var[EP]], "T E"]) -> Float[Placed[Var[EP]], "T E"]:
        """Keep the experts of the num_limited_groups best groups (group score: the sum
        of its top-2 scores); the others get -inf."""
        g = self.cfg.num_expert_groups
        lg = self.cfg.num_limited_groups
        assert g is not None and lg is not None  # validated by MoEConfig
        grouped_TGe = scores_TE.reshape(scores_TE.shape[0], g, self.cfg.num_experts // g)
        group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        keep_TG = torch.topk(group_scores_TG, k=lg, dim=-1, sorted=False).indices
        drop_TG = torch.ones_like(group_scores_TG, dtype=torch.bool).scatter_(-1, keep_TG, False)
        return grouped_TGe.masked_fill(drop_TG.unsqueeze(-1), float("-inf")).flatten(-2)

    @checked(tokens=("x_TD",))
    def forward(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_bias_E: Float[Placed[Rep[EP]], "E"] | None = None,
    ) -> tuple[Float[Placed[Var[EP]], "T K"], Int[Placed[Var[EP]], "T K"], Float[Placed[Var[EP]], "T E"]]:
        """Return (weights_TK, expert_ids_TK, scores_TE).

        The gate and the score function run in fp32 (as torchtitan) whatever the input
        dtype; weights_TK stays fp32 so the combine can weight in fp32.
        """
        w_ED = self.gate_weight()  # once per call, also in batch-invariant mode
        if _bi._enabled:
            # Batch-invariant mode: a token's route depends on that token only (fixed-shape
            # blocks on CPU, invariant kernels on CUDA; see spmd_moe.batch_invariant).
            fast = _bi.route(x_TD, w_ED, expert_bias_E, self.cfg)  # CUDA: GEMM + one kernel per token
            if fast is not None:
                return fast
            return _bi.rowwise(lambda r_BD: self._route(r_BD, expert_bias_E, w_ED), x_TD)
        return self._route(x_TD, expert_bias_E, w_ED)

    def fast_route(
        self, x_TD: Float[Placed[Var[EP]], "T D"], expert_bias_E: Float[Placed[Rep[EP]], "E"] | None = None,
    ) -> tuple[Float[Placed[Var[EP]], "T K"], Int[Placed[Var[EP]], "T K"]] | None:
        """(weights_TK, expert_ids_TK) with the ids ascending per token (the combine's
        order), from spmd_moe.kernels.fast_route where it applies (CUDA inference,
        kernels='fast'; within fp32 rounding of forward's, not bitwise); else None."""
        w_ED = self.gate.weight
        if not _fr.applies(self.cfg.kernels, x_TD, w_ED, groups=self.cfg.num_expert_groups is not None):
            return None
        weights_TK, ids_TK = _fr.route(
            x_TD, w_ED, expert_bias_E, top_k=self.cfg.top_k, score_func=self.cfg.score_func,
            route_norm=self.cfg.route_norm, route_scale=self.cfg.route_scale,
        )
        why = "this rank's tokens, routed token by token"
        return unchecked_cast(Placed[Var[EP]], weights_TK, reason=why), unchecked_cast(Placed[Var[EP]], ids_TK, reason=why)

    def _route(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        expert_bias_E: Float[Placed[Rep[EP]], "E"] | None,
        w_ED: Float[Placed[Rep[EP]], "E D"],
    ) -> tuple[Float[Placed[Var[EP]], "T K"], Int[Placed[Var[EP]], "T K"], Float[Placed[Var[EP]], "T E"]]:
        logits_TE = F.linear(x_TD.float(), w_ED.float())
        if _debug._enabled and not bool(torch.isfinite(logits_TE).all()):
            bad = int((~torch.isfinite(x_TD)).any(dim=-1).sum())
            raise RoutingError(
                f"{self.layer_name}: router input x_TD: expected finite values, got NaN/inf "
                f"in {bad} of {x_TD.shape[0]} tokens (router logits non-finite). "
                "Fix: find the layer before this MoE that produced NaN/inf (check its "
                "inputs and the learning rate); with debug off such tokens are routed "
                "to arbitrary experts and their outputs are NaN."
            )
        if self.cfg.score_func == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = F.softmax(logits_TE, dim=-1)
        choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
        if self.cfg.num_expert_groups is not None:
            choice_TE = self._group_limit(choice_TE)
        expert_ids_TK = torch.topk(choice_TE, k=self.cfg.top_k, dim=-1, sorted=False).indices
        # The bias picks the experts; the gate value comes from the unbiased scores.
        weights_TK = scores_TE.gather(-1, expert_ids_TK)
        if self.cfg.route_norm:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.cfg.route_scale != 1.0:  # x * 1.0 == x: skip the kernel
            weights_TK = weights_TK * self.cfg.route_scale
        return weights_TK, expert_ids_TK, scores_TE
