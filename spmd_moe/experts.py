"""GroupedExperts (this rank's E/n SwiGLU experts) and the TP-sharded shared experts.

Shape suffixes: R rows routed to this rank (expert-sorted), D model dim, F expert hidden
dim, e local experts. Parameter names equal torchtitan's (w1_EFD gate, w3_EFD up,
w2_EDF down) so state dicts move both ways.
"""

from __future__ import annotations

from typing import Any

import spmd_types as spmd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from spmd_moe.config import MoEConfig
from spmd_moe.parallel import ParallelContext
from spmd_moe import batch_invariant as _bi
from spmd_moe import collectives as C
from spmd_moe.placement import EP, Par, Placed, Rep, Var, as_rep, as_var, unchecked_cast
from spmd_moe.checking import checked
from spmd_moe.kernels import fused_bwd as _fb
from spmd_moe.kernels import gather_gemm as _gg

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x.device.type == "cuda":
        # Hopper grouped GEMM: bf16 only, 16-byte aligned rows.
        return x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0
    return x.device.type == "cpu"


@spmd.register_local_autograd_function  # per-rank GEMMs, no communication: placements propagate
class _GroupedMM(torch.autograd.Function):
    """y_RF = x_RD @ w_EFD[e].T per expert group, grads by grouped GEMMs too.

    Our own backward because torch's CPU grouped-mm backward rejects stride-0
    gradients (e.g. from .sum()) and unaligned transposes.
    """

    @staticmethod
    def forward(ctx: Any, x_RD: torch.Tensor, w_EFD: torch.Tensor, offs_e: torch.Tensor, zero_tail: bool = True) -> torch.Tensor:
        ctx.save_for_backward(x_RD, w_EFD, offs_e)
        ctx.zero_tail = zero_tail
        y_RF = torch._grouped_mm(x_RD, w_EFD.transpose(-2, -1), offs=offs_e)
        return _zero_tail(y_RF, offs_e) if zero_tail else y_RF

    @staticmethod
    def backward(ctx: Any, grad_RF: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x_RD, w_EFD, offs_e = ctx.saved_tensors
        grad_RF = grad_RF.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch._grouped_mm(grad_RF, w_EFD.contiguous(), offs=offs_e)
            if ctx.zero_tail:  # else no rows past the last offset exist
                gx = _zero_tail(gx, offs_e)
        if ctx.needs_input_grad[1]:
            gw = _per_expert_grad_w(grad_RF, x_RD, offs_e, w_EFD)
        return gx, gw, None, None


def _zero_tail(y_RF: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    """Rows past the last offset belong to no expert; the kernel leaves them undefined."""
    if offs_e.numel() == 0:
        return torch.zeros_like(y_RF)
    # arange in the offsets' dtype: no type promotion in the compare (~70 us on CPU).
    keep_R = torch.arange(y_RF.shape[0], device=y_RF.device, dtype=offs_e.dtype) < offs_e[-1]
    return torch.where(keep_R.unsqueeze(-1), y_RF, torch.zeros((), dtype=y_RF.dtype, device=y_RF.device))


def _per_expert_grad_w(g_RF: torch.Tensor, x_RD: torch.Tensor, offs_e: torch.Tensor, w_EFD: torch.Tensor) -> torch.Tensor:
    if g_RF.device.type == "cuda":
        rows_ok = g_RF.shape[0] * g_RF.element_size() % 16 == 0
        if rows_ok:
            return torch._grouped_mm(g_RF.t(), x_RD, offs=offs_e)
    elif (x_RD.shape[-1] * x_RD.element_size()) % 16 == 0 and (g_RF.shape[-1] * g_RF.element_size()) % 16 == 0:
        # CPU: the very call torch's own _grouped_mm backward makes for a transposed
        # mat2 = w.T (grad.T @ x per group), same shapes and strides, so the weight
        # gradient is bitwise torch's autograd (torchtitan's) whatever GEMM kernel the
        # CPU picks. torch accepts it only with 16-byte-aligned rows; else the loop below.
        return torch._grouped_mm(g_RF.t(), x_RD, offs=offs_e)
    ends = offs_e.tolist()  # host sync: backward only
    gw = torch.zeros_like(w_EFD)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            gw[e] = g_RF[start:end].t() @ x_RD[start:end]
        start = end
    return gw


def grouped_mm(
    x_RD: Float[Placed[Var[EP]], "R D"], w_EFD: torch.Tensor, counts_e: Int[Placed[Var[EP]], " e"], *,
    zero_tail: bool = True, offs_e: torch.Tensor | None = None,
) -> Float[Placed[Var[EP]], "R F"]:
    """Per-expert x @ w.T for rows grouped by expert (counts_e rows each).

    Rows past sum(counts_e) (the decode dispatcher's non-local slots) come back zero.
    zero_tail=False: the caller guarantees there are none (x_RD has exactly
    sum(counts_e) rows), which saves a full pass over the output on the GPU path.
    offs_e: int32 cumsum(counts_e), when the caller already has it (saves a scan).
    """
    if _grouped_mm_ok(x_RD, w_EFD):
        if offs_e is None:
            offs_e = torch.cumsum(counts_e, dim=0, dtype=torch.int32)
        if not torch.is_grad_enabled() and not spmd.is_type_checking():
            # Inference (vLLM): the same kernel without the autograd Function, whose
            # apply costs ~90 us per call on CPU (3 per layer per decode step).
            y_RF = torch._grouped_mm(x_RD, w_EFD.transpose(-2, -1), offs=offs_e)
            return unchecked_cast(Placed[Var[EP]], _zero_tail(y_RF, offs_e) if zero_tail else y_RF,
                                  reason="per-rank GEMMs of this rank's rows and experts")
        out: Placed[Var[EP]] = _GroupedMM.apply(x_RD, w_EFD, offs_e, zero_tail)  # type: ignore[no-untyped-call]
        return out
    # Reference path (float64, other devices): one host sync for the split sizes.
    sizes = counts_e.tolist()
    tail = x_RD.shape[0] - sum(sizes)
    parts = torch.split(x_RD, sizes + [tail])
    outs: list[torch.Tensor] = [p @ w_EFD[e].transpose(0, 1) for e, p in enumerate(parts[:-1])]
    outs.append(x_RD.new_zeros(tail, w_EFD.shape[-2]))
    return unchecked_cast(Placed[Var[EP]], torch.cat(outs), reason="this rank's experts on the rows it holds")


class GroupedExperts(nn.Module):
    """This rank's e = E/n experts. Weights are Varying over the expert axis (each
    rank holds different experts); so are the rows it receives."""

    def __init__(self, cfg: MoEConfig, pctx: ParallelContext[EP], device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        self.pctx = pctx
        self.num_experts = cfg.num_experts
        self.expert_start, self.expert_stop = pctx.local_experts(cfg.num_experts)
        e = self.expert_stop - self.expert_start
        kw: dict[str, Any] = {"device": device, "dtype": cfg.param_dtype}
        self.w1_EFD = nn.Parameter(torch.empty(e, cfg.hidden_dim, cfg.dim, **kw))
        self.w2_EDF = nn.Parameter(torch.empty(e, cfg.dim, cfg.hidden_dim, **kw))
        self.w3_EFD = nn.Parameter(torch.empty(e, cfg.hidden_dim, cfg.dim, **kw))

    @property
    def num_local_experts(self) -> int:
        return self.expert_stop - self.expert_start

    @checked
    def forward(
        self,
        routed_RD: Float[Placed[Var[EP]], "R D"],
        counts_e: Int[Placed[Var[EP]], " e"],
        rows_exact: bool = False,
    ) -> Float[Placed[Var[EP]], "R D"]:
        """SwiGLU per expert in MoEConfig.expert_dtype (None: the input's dtype).

        rows_exact: routed_RD has exactly sum(counts_e) rows (the local and all-to-all
        dispatchers); the GEMM outputs then need no zeroed tail.
        """
        zt = not rows_exact
        offs = torch.cumsum(counts_e, dim=0, dtype=torch.int32)  # once for the three GEMMs
        dt = self.cfg.expert_dtype or routed_RD.dtype
        w1, w2, w3 = self.w1_EFD.to(dt), self.w2_EDF.to(dt), self.w3_EFD.to(dt)
        if _bi._enabled:  # one [1, D] row at a time: see spmd_moe.batch_invariant
            return _bi.grouped_swiglu_rows(routed_RD.to(dt), w1, w2, w3, counts_e).to(routed_RD.dtype)
        # One cast per use: the two input grads then add in the input dtype (fp32),
        # not in dt (bf16); that is also torchtitan's order, so its grads match bitwise.
        # Without autograd the rows past the counts of the up GEMMs are never read (the
        # down GEMM reads only grouped rows): only the output's tail is zeroed.
        zt_up = zt and (torch.is_grad_enabled() or spmd.is_type_checking())
        train = _fb.applies(self.cfg.kernels, w1, w3, routed_RD)
        if train or _fb.applies_forward(self.cfg.kernels, w1, w3, routed_RD):
            # CUDA, kernels='fast': silu and mul in one kernel; training: with its backward
            # (one kernel too), inference: the same forward kernel without autograd.
            swiglu = _fb.swiglu if train else _fb.swiglu_forward
            h_RF = swiglu(grouped_mm(routed_RD.to(dt), w1, counts_e, zero_tail=zt_up, offs_e=offs),
                          grouped_mm(routed_RD.to(dt), w3, counts_e, zero_tail=zt_up, offs_e=offs))
            return grouped_mm(h_RF, w2, counts_e, zero_tail=zt, offs_e=offs).to(routed_RD.dtype)
        h_RF = F.silu(grouped_mm(routed_RD.to(dt), w1, counts_e, zero_tail=zt_up, offs_e=offs)) * grouped_mm(
            routed_RD.to(dt), w3, counts_e, zero_tail=zt_up, offs_e=offs
        )
        return grouped_mm(h_RF, w2, counts_e, zero_tail=zt, offs_e=offs).to(routed_RD.dtype)

    def gathers_rows(self, x_TD: torch.Tensor) -> bool:
        """Whether forward_slots applies (spmd_moe.kernels.gather_gemm: CUDA inference,
        kernels='fast', bf16, the experts in the input's dtype)."""
        if self.cfg.expert_dtype not in (None, x_TD.dtype):
            return False
        return _gg.applies(self.cfg.kernels, x_TD, self.w1_EFD, self.w3_EFD)

    def forward_slots(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        slots_R: Int[Placed[Var[EP]], " R"],
        counts_e: Int[Placed[Var[EP]], " e"],
        top_k: int,
    ) -> Float[Placed[Var[EP]], "R D"]:
        """forward on the rows x_TD[slots_R // top_k] without gathering them: the up GEMMs
        read x through the slots, with SwiGLU in their epilogue (one kernel); then the
        down grouped GEMM. Exactly sum(counts_e) rows (inference only: see gathers_rows)."""
        return grouped_mm(self.up_slots(x_TD, slots_R, counts_e, top_k), self.w2_EDF, counts_e, zero_tail=False)

    def up_slots(
        self,
        x_TD: Float[Placed[Var[EP]], "T D"],
        slots_R: Int[Placed[Var[EP]], " R"],
        counts_e: Int[Placed[Var[EP]], " e"],
        top_k: int,
    ) -> Float[Placed[Var[EP]], "R F"]:
        """forward_slots' first stage, silu(x w1^T) * (x w3^T) on the slots' rows (the
        caller may run the down projection later: the EP exchange's local-first schedule)."""
        return _gg.gathered_swiglu(x_TD, slots_R, counts_e, self.w1_EFD, self.w3_EFD, top_k)


class SharedExperts(nn.Module):
    """Dense SwiGLU MLP on every token, hidden dim sharded over the expert axis (TP):
    w1/w3 column-parallel, w2 row-parallel, so the output is Partial. With
    cfg.shared_gate, each token's output is scaled by sigmoid(x_TD @ gate.weight[0])
    (Qwen2-MoE's shared_expert_gate; the [1, D] gate is Replicate)."""

    def __init__(self, cfg: MoEConfig, pctx: ParallelContext[EP], device: torch.device | None = None):
        super().__init__()
        assert cfg.shared_hidden_dim is not None
        self.pctx = pctx
        f = cfg.shared_hidden_dim // pctx.size
        kw: dict[str, Any] = {"device": device, "dtype": cfg.param_dtype, "bias": False}
        self.w1 = nn.Linear(cfg.dim, f, **kw)
        self.w2 = nn.Linear(f, cfg.dim, **kw)
        self.w3 = nn.Linear(cfg.dim, f, **kw)
        self.gate = nn.Linear(cfg.dim, 1, **kw) if cfg.shared_gate else None

    def _shards(self) -> tuple[Placed[Var[EP]], Placed[Var[EP]], Placed[Var[EP]]]:
        """(w1_FD, w2_DF, w3_FD): this rank's slice of the hidden dim (Varying)."""
        p, what = self.pctx, "SharedExperts"
        return (
            as_var(self.w1.weight, p, f"{what}.w1.weight"),
            as_var(self.w2.weight, p, f"{what}.w2.weight"),
            as_var(self.w3.weight, p, f"{what}.w3.weight"),
        )

    @checked
    def forward(self, x_TD: Float[Placed[Rep[EP]], "T D"]) -> Float[Placed[Par[EP]], "T D"]:
        w1_FD, w2_DF, w3_FD = self._shards()
        if self.gate is not None:
            g_1D = as_rep(self.gate.weight, self.pctx, "SharedExperts.gate.weight")
            if _bi._enabled:  # one [1, D] row at a time: see spmd_moe.batch_invariant
                y_TD = _bi.rowwise(
                    lambda r_1D: F.linear(F.silu(F.linear(r_1D, w1_FD)) * F.linear(r_1D, w3_FD), w2_DF)
                    * torch.sigmoid(F.linear(r_1D, g_1D)),
                    x_TD,
                )
                return C.partial_from_shards(y_TD, self.pctx)
            # This rank's share of the output times the per-token gate: the scale is the
            # same on every rank, so the sum over ranks is the gated full output.
            h_TF = F.silu(F.linear(x_TD, w1_FD)) * F.linear(x_TD, w3_FD)
            gated_TD = F.linear(h_TF, w2_DF) * torch.sigmoid(F.linear(x_TD, g_1D))
            return C.partial_from_shards(gated_TD, self.pctx)
        if _bi._enabled:  # one [1, D] row at a time: see spmd_moe.batch_invariant
            y_TD = _bi.rowwise(lambda r_1D: F.linear(F.silu(F.linear(r_1D, w1_FD)) * F.linear(r_1D, w3_FD), w2_DF), x_TD)
            return C.partial_from_shards(y_TD, self.pctx)
        h_TF = F.silu(F.linear(x_TD, w1_FD)) * F.linear(x_TD, w3_FD)
        return C.partial_from_shards(F.linear(h_TF, w2_DF), self.pctx)
