"""Fused SwiGLU and combine for training on CUDA (MoEConfig.kernels == 'fast', autograd).

Two autograd Functions, each one Triton kernel forward and one backward, where torch's
autograd runs several elementwise kernels over [R, F] and fp32 [T, K, D] temporaries:

    swiglu     h_RF = silu(a1_RF) * a3_RF; saves a1, a3 only (autograd also keeps silu(a1))
               backward: grad_a1 and grad_a3 from grad_h in one kernel
    combine    out_TD = sum_k w_TK[t, k] * rows_SD[row of slot t*K+k], reading each expert
               row through the inverse of the slot map (no [T, K, D] slots, no fp32 copy)
               backward: grad_rows_SD (in the rows' layout) and grad_w_TK in one kernel

Rounding, bf16 (in fp32 math inside): the forwards round where torch's eager bf16 ops do
(silu to bf16, then the product; each weighted term, then each add in ascending k), so
the combine's forward is bitwise spmd_moe.moe's _weighted_sum(scatter_to_slots(...)), and
so is its grad_rows (autograd's fp32 product g * w cast to bf16). SwiGLU computes silu
with libdevice's expf and IEEE division as torch's CUDA kernel does, and its grads with
torch's own rounding points (g * a3 rounded before silu_backward): bitwise torch's
where the compiled fp32 code agrees (FMA contraction is the compiler's choice on both
sides), else one bf16 ulp. grad_w_TK is an fp32 dot over D in another order than torch's
reduction: equal to fp32 rounding (tests/test_fused_backward.py states the tolerances);
GRAD_W = "torch" (the default) makes it bitwise autograd's with one fp32 [T, K, D] buffer.

Used by spmd_moe.experts / spmd_moe.moe only where ``applies`` says so: kernels='fast',
autograd recording, not batch-invariant, not debug mode, bf16 on CUDA with Triton. On CPU
the torch path stays (tests opt in to Triton's interpreter with fp32 tensors).

Inference (no autograd recording) takes SwiGLU's forward kernel alone, where
``applies_forward`` says so (the same conditions, no autograd; switch: FWD_INFERENCE):
``swiglu_forward`` launches it without the autograd Function, one kernel for torch's silu
and mul over [R, F] (the prefill's largest elementwise work after the gather).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import spmd_types as spmd
import torch
from jaxtyping import Float, Int

from spmd_moe import _debug
from spmd_moe.kernels import _lazy
from spmd_moe import batch_invariant as _bi
from spmd_moe.placement import EP, Placed, Var, unchecked_cast


def _build() -> Any:
    """The kernel module, or None without Triton (imported once, on first use)."""
    return _lazy.load("_fused_bwd_triton")


def _interpreting() -> bool:
    """The tests' interpreter opt-in (SPMD_MOE_FUSED_BWD_INTERPRET=1): fp32 tensors, fp32 math."""
    return _lazy.interpreting("SPMD_MOE_FUSED_BWD_INTERPRET")


def applies(kernels: str, *tensors: torch.Tensor) -> bool:
    """Whether the fused training kernels replace the torch ops on ``tensors``: kernels
    'fast', autograd recording a graph through one of them, batch-invariant and debug
    mode off, bf16 on CUDA (or fp32 under the tests' interpreter opt-in), Triton present."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False  # first: inference (vLLM, decode) pays only this check
    return _fast_kernels_ok(kernels, tensors[0])


# Inference takes the fused SwiGLU forward (swiglu_forward) where applies_forward says so;
# False keeps torch's silu and mul there (the prefill bench's side-by-side switch; env
# SPMD_MOE_FUSED_SWIGLU_INFERENCE=0). Training (applies) does not read it.
FWD_INFERENCE: bool = os.environ.get("SPMD_MOE_FUSED_SWIGLU_INFERENCE", "1") != "0"


def applies_forward(kernels: str, *tensors: torch.Tensor) -> bool:
    """Whether inference on ``tensors`` takes the fused SwiGLU forward (swiglu_forward)
    in place of torch's silu and mul: applies' conditions (kernels 'fast', batch-invariant
    and debug mode off, bf16 on CUDA or the tests' interpreter opt-in, Triton) with NO
    autograd recording through any of them (no_grad, inference_mode, or no tensor
    requiring grad), and FWD_INFERENCE on. Training takes ``applies``/``swiglu`` instead."""
    if not FWD_INFERENCE or kernels != "fast":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # autograd recording: applies/swiglu (training), or the torch ops
    return _fast_kernels_ok(kernels, tensors[0])


def _fast_kernels_ok(kernels: str, t0: torch.Tensor) -> bool:
    """applies' and applies_forward's common part, past the autograd test (the device
    first: CPU inference stops there, ~1 us)."""
    if t0.device.type == "cuda":
        ok = t0.dtype == torch.bfloat16
    else:
        ok = t0.dtype == torch.float32 and _interpreting()
    if not ok or kernels != "fast" or _bi._enabled or _debug._enabled or spmd.is_type_checking():
        return False
    return _build() is not None


def _round_bf16(dtype: torch.dtype, bf16_math: bool | None) -> bool:
    return dtype == torch.bfloat16 if bf16_math is None else bf16_math


# --------------------------------------------------------------------------- SwiGLU

_SWIGLU_BLOCK = 1024


def _swiglu_fwd(a1_RF: torch.Tensor, a3_RF: torch.Tensor, round_bf16: bool) -> torch.Tensor:
    """h = silu(a1) * a3, one kernel (contiguous inputs): the forward of swiglu and swiglu_forward."""
    h_RF = torch.empty_like(a1_RF)
    n = a1_RF.numel()
    if n:
        _build().swiglu_fwd_kernel[(triton_cdiv(n, _SWIGLU_BLOCK),)](h_RF, a1_RF, a3_RF, n, BLOCK=_SWIGLU_BLOCK,
                                                                     ROUND=round_bf16, num_warps=4)
    return h_RF


@spmd.register_local_autograd_function  # elementwise: placements propagate
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a1_RF: torch.Tensor, a3_RF: torch.Tensor, round_bf16: bool) -> torch.Tensor:
        a1_RF, a3_RF = a1_RF.contiguous(), a3_RF.contiguous()
        h_RF = _swiglu_fwd(a1_RF, a3_RF, round_bf16)
        ctx.save_for_backward(a1_RF, a3_RF)
        ctx.round_bf16 = round_bf16
        return h_RF

    @staticmethod
    def backward(ctx: Any, g_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        k = _build()
        a1_RF, a3_RF = ctx.saved_tensors
        g_RF = g_RF.contiguous()  # e.g. the stride-0 gradient of a .sum()
        ga1_RF, ga3_RF = torch.empty_like(a1_RF), torch.empty_like(a3_RF)
        n = a1_RF.numel()
        if n:
            k.swiglu_bwd_kernel[(triton_cdiv(n, _SWIGLU_BLOCK),)](ga1_RF, ga3_RF, g_RF, a1_RF, a3_RF, n,
                                                                  BLOCK=_SWIGLU_BLOCK, ROUND=ctx.round_bf16, num_warps=4)
        return ga1_RF, ga3_RF, None


def swiglu(
    a1_RF: Float[Placed[Var[EP]], "R F"], a3_RF: Float[Placed[Var[EP]], "R F"], *, bf16_math: bool | None = None
) -> Float[Placed[Var[EP]], "R F"]:
    """silu(a1_RF) * a3_RF with autograd, one kernel each way. bf16_math: round as bf16
    ops do (default: when the tensors are bf16; the tests set it for fp32 stand-ins)."""
    assert a1_RF.shape == a3_RF.shape and a1_RF.dtype == a3_RF.dtype, (a1_RF.shape, a3_RF.shape)
    h_RF = _SwiGLU.apply(a1_RF, a3_RF, _round_bf16(a1_RF.dtype, bf16_math))  # type: ignore[no-untyped-call]
    return unchecked_cast(Placed[Var[EP]], h_RF, reason="elementwise on this rank's rows")


def swiglu_forward(
    a1_RF: Float[Placed[Var[EP]], "R F"], a3_RF: Float[Placed[Var[EP]], "R F"], *, bf16_math: bool | None = None
) -> Float[Placed[Var[EP]], "R F"]:
    """silu(a1_RF) * a3_RF for inference (no autograd: nothing saved, no Function), the
    very kernel of swiglu's forward, so the same bits. bf16_math as swiglu's."""
    assert a1_RF.shape == a3_RF.shape and a1_RF.dtype == a3_RF.dtype, (a1_RF.shape, a3_RF.shape)
    h_RF = _swiglu_fwd(a1_RF.contiguous(), a3_RF.contiguous(), _round_bf16(a1_RF.dtype, bf16_math))
    return unchecked_cast(Placed[Var[EP]], h_RF, reason="elementwise on this rank's rows")


# --------------------------------------------------------------------------- combine

# How the combine's backward gets grad_w_TK: "torch" (default), the kernel stores the fp32
# products g * row and torch sums them over D, the reduction autograd runs, so grad_w is
# bitwise autograd's (and torchtitan's: measured on an H200, every gradient of the Qwen3
# layer at T = 4096 and 32768) at the cost of one fp32 [T, K, D] buffer (written once,
# read once); "dot", an fp32 dot over D inside the kernel (no [T, K, D] temporary; equal to
# autograd's up to fp32 reassociation; 1.56x vs 1.44x torchtitan's fwd+bwd at T = 32768),
# opt in with SPMD_MOE_FUSED_GRAD_W=dot. The default keeps kernels='fast' training bitwise
# torchtitan's, which the torchtitan integration's parity rests on.
GRAD_W: Literal["dot", "torch"] = "dot" if os.environ.get("SPMD_MOE_FUSED_GRAD_W") == "dot" else "torch"


@spmd.register_local_autograd_function  # this rank's rows into this rank's tokens: placements propagate
class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows_SD: torch.Tensor, slots_S: torch.Tensor, w_TK: torch.Tensor, round_bf16: bool) -> torch.Tensor:
        k = _build()
        T, K = w_TK.shape
        S, D = rows_SD.shape
        dev = rows_SD.device
        # row_of_slot_N[slot] = the row holding it; -1: unsent (pad tokens' slots).
        row_of_slot_N = torch.full((T * K,), -1, dtype=torch.int32, device=dev) if S < T * K else (
            torch.empty(T * K, dtype=torch.int32, device=dev))
        row_of_slot_N.index_copy_(0, slots_S, torch.arange(S, dtype=torch.int32, device=dev))
        rows_SD = rows_SD.contiguous()
        w32_TK = w_TK.float().contiguous()
        out_TD = torch.empty(T, D, dtype=rows_SD.dtype, device=dev)
        if T and D:
            block = min(1024, _pow2(D))
            k.combine_fwd_kernel[(T, triton_cdiv(D, block))](
                out_TD, rows_SD, row_of_slot_N, w32_TK, D, K=K, BLOCK_D=block, ROUND=round_bf16,
                num_warps=4, enable_fp_fusion=False)
        ctx.save_for_backward(rows_SD, row_of_slot_N, w32_TK)
        ctx.round_bf16 = round_bf16
        ctx.w_dtype = w_TK.dtype
        return out_TD

    @staticmethod
    def backward(ctx: Any, g_TD: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor, None]:
        k = _build()
        rows_SD, row_of_slot_N, w32_TK = ctx.saved_tensors
        T, K = w32_TK.shape
        D = rows_SD.shape[-1]
        g_TD = g_TD.contiguous()
        dev = rows_SD.device
        grad_rows_SD = torch.empty_like(rows_SD)  # every row belongs to one slot: all written
        grad_w_TK = torch.empty(T, K, dtype=torch.float32, device=dev)
        prod = GRAD_W == "torch"
        prod_TKD = torch.empty(T, K, D, dtype=torch.float32, device=dev) if prod else grad_w_TK
        if T:
            kp2 = _pow2(K)
            k.combine_bwd_kernel[(T,)](
                grad_rows_SD, grad_w_TK, prod_TKD, g_TD, rows_SD, row_of_slot_N, w32_TK, D,
                K=K, K_P2=kp2, BLOCK_D=max(16, min(_pow2(D), 2048 // kp2)), ROUND=ctx.round_bf16, PROD=prod,
                num_warps=4)
        if prod:  # the very reduction autograd runs on its [T, K, D] fp32 product: the same bits
            grad_w_TK = prod_TKD.sum(-1)
        return grad_rows_SD, None, grad_w_TK.to(ctx.w_dtype), None


def weighted_combine(
    rows_SD: Float[Placed[Var[EP]], "S D"], slots_S: Int[Placed[Var[EP]], " S"], weights_TK: Float[Placed[Var[EP]], "T K"],
    *, bf16_math: bool | None = None,
) -> Float[Placed[Var[EP]], "T D"]:
    """y[t] = sum_k w[t, k] * row(slot t*K+k) with autograd, rows_SD[i] holding slot
    slots_S[i] (distinct slots; unsent slots count as zero rows). bf16_math as swiglu's."""
    assert rows_SD.shape[0] == slots_S.shape[0] <= weights_TK.numel(), (rows_SD.shape, slots_S.shape, weights_TK.shape)
    y_TD = _Combine.apply(rows_SD, slots_S, weights_TK, _round_bf16(rows_SD.dtype, bf16_math))  # type: ignore[no-untyped-call]
    return unchecked_cast(Placed[Var[EP]], y_TD, reason="combine + weighted sum of this rank's rows, in one kernel")


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
