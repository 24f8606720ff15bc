"""Batch-invariant grouped GEMM in Triton (CUDA; Triton's interpreter for tests on CPU).

    y[r, n] = sum_k a[r, k] * w[g(r), n, k]        rows r grouped by g (ends_g cumulative)

Why a row's result cannot depend on the batch: one program computes a [BM, BN] tile of
one group's rows; it walks K in BK steps, always from k = 0 upwards, adding each step's
tl.dot into the same fp32 accumulator; there is no split-K and the tile shapes and
instruction choice are compile-time constants that depend on the dtype only (never on
the row count, no autotuning; the row count is not specialised on). In a tl.dot every
output element is the dot product of its own row of a with a column of w, so the other
rows of the tile (other tokens, or masked zeros) never enter a row's accumulation.
Masked K tails load zeros: adding +0 products is exact.

Used by spmd_moe.batch_invariant on CUDA for the grouped experts, the router GEMM and
the shared experts (G = 1), forward and input-gradient (the same kernel with w's strides
swapped). Weight gradients are sums over rows and use torch's grouped GEMM.
"""

from __future__ import annotations

import os
from typing import Any

import spmd_types as spmd
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_kernel: Any = None
_tried = False
#: Tests only: run the Triton path on CPU tensors (with TRITON_INTERPRET=1).
ON_CPU = False


def wants(x: torch.Tensor) -> bool:
    """Whether x's device takes the Triton path."""
    return x.is_cuda or (ON_CPU and x.device.type == "cpu")


def available() -> bool:
    """Triton importable (CUDA, or the interpreter with TRITON_INTERPRET=1)."""
    return _build() is not None


def _build() -> Any:
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    try:
        from spmd_moe.kernels.invariant_triton import grouped_gemm_kernel
    except ImportError:
        return None
    _kernel = grouped_gemm_kernel
    return _kernel


def _config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages): a function of the dtype only (never of the
    row count). SPMD_MOE_INVARIANT_TILES="BM,BN,BK,warps,stages" overrides the 16-bit
    one (benchmark sweeps; both sides of a parity check must use the same)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    env = os.environ.get("SPMD_MOE_INVARIANT_TILES")
    if env:
        bm, bn, bk, w, st = (int(v) for v in env.split(","))
        return bm, bn, bk, w, st
    return 128, 128, 64, 8, 3


def _launch(a_RK: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], N: int,
            ends_g: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """ends_g None: one group of all rows (dense GEMM)."""
    kern = _build()
    assert kern is not None, "Triton is not installed"
    R, K = a_RK.shape
    y = torch.empty(R, N, dtype=out_dtype, device=a_RK.device)
    if R == 0 or N == 0:
        return y
    if ends_g is not None and ends_g.numel() == 0:
        return y.zero_()
    BM, BN, BK, warps, stages = _config(a_RK.dtype)
    mt = (R + BM - 1) // BM
    nt = (N + BN - 1) // BN
    if ends_g is None:
        ends, G, grid = y, 1, (mt * nt,)
    else:
        ends = ends_g if ends_g.dtype == torch.int64 else ends_g.to(torch.int64)
        # Upper bound of group tiles (mt + G) plus tail tiles (<= mt), times the N tiles.
        G, grid = ends.shape[0], ((2 * mt + ends.shape[0]) * nt,)
    kern[grid](
        a_RK, w, y, ends, R, N, K, G,
        a_RK.stride(0), a_RK.stride(1), w_strides[0], w_strides[1], w_strides[2], y.stride(0), y.stride(1),
        BM=BM, BN=BN, BK=BK, GP=max(16, 1 << (G - 1).bit_length()), IEEE=a_RK.dtype == torch.float32,
        DENSE=ends_g is None, num_warps=warps, num_stages=stages,
    )
    return y


def _grad_w(g_RN: torch.Tensor, x_RK: torch.Tensor, ends_g: torch.Tensor | None, w_GNK: torch.Tensor) -> torch.Tensor:
    """Per-group g.T @ x (a sum over the group's rows: not part of the invariance claim)."""
    if ends_g is None:
        return (g_RN.t() @ x_RK).unsqueeze(0).to(w_GNK.dtype)
    if g_RN.dtype == torch.bfloat16 and g_RN.is_cuda:
        from spmd_moe.experts import _per_expert_grad_w  # torch's grouped GEMM (bf16 on CUDA)

        return _per_expert_grad_w(g_RN, x_RK, ends_g.to(torch.int32), w_GNK)
    gw = torch.zeros_like(w_GNK)
    start = 0
    for e, end in enumerate(ends_g.tolist()):  # host sync: backward only
        if end > start:
            gw[e] = (g_RN[start:end].t() @ x_RK[start:end]).to(gw.dtype)
        start = end
    return gw


@spmd.register_local_autograd_function  # per-rank GEMMs, no communication: placements propagate
class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_RK: torch.Tensor, w_GNK: torch.Tensor, ends_g: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x_RK, w_GNK)
        ctx.ends_g = ends_g
        w = w_GNK
        return _launch(x_RK, w, (w.stride(0), w.stride(1), w.stride(2)), w.shape[1], ends_g, x_RK.dtype)

    @staticmethod
    def backward(ctx: Any, g_RN: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_RK, w_GNK = ctx.saved_tensors
        ends_g = ctx.ends_g
        g_RN = g_RN.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            # gx[r, k] = sum_n g[r, n] * w[g, n, k]: the same kernel, w read as [G, K, N].
            w = w_GNK
            gx = _launch(g_RN, w, (w.stride(0), w.stride(2), w.stride(1)), w.shape[2], ends_g, x_RK.dtype)
        if ctx.needs_input_grad[1]:
            gw = _grad_w(g_RN, x_RK, ends_g, w_GNK)
        return gx, gw, None


def grouped_linear(x_RK: torch.Tensor, w_GNK: torch.Tensor, ends_g: torch.Tensor | None) -> torch.Tensor:
    """[R, K] rows grouped by ends_g (cumulative row counts) times w[g].T -> [R, N];
    rows past ends_g[-1] come out zero; ends_g None: one group of all rows (G = 1).
    Differentiable in x and w."""
    out: torch.Tensor = _GroupedLinear.apply(x_RK, w_GNK, ends_g)  # type: ignore[no-untyped-call]
    return out


def linear(x_TK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, batch-invariant (G = 1); any leading dims."""
    lead = x_TK.shape[:-1]
    x2 = x_TK.reshape(-1, x_TK.shape[-1])
    return grouped_linear(x2, w_NK.unsqueeze(0), None).reshape(*lead, w_NK.shape[0])


def grouped_swiglu(x_RD: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor, w3_EFD: torch.Tensor,
                   counts_e: torch.Tensor) -> torch.Tensor:
    """w2 @ (silu(w1 @ x) * (w3 @ x)) per expert group; rows of no expert come out zero."""
    ends = torch.cumsum(counts_e.to(torch.int64), 0)
    h = F.silu(grouped_linear(x_RD, w1_EFD, ends)) * grouped_linear(x_RD, w3_EFD, ends)
    return grouped_linear(h, w2_EDF, ends)


def ordered_sum_last(x: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """Sum over the last dim as a fixed tree of elementwise adds (halves, then the odd
    element): the pairing depends on the dim's length only; log2 launches."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        s = x[..., :h] + x[..., h : 2 * h]
        x = torch.cat([s, x[..., 2 * h :]], dim=-1) if n % 2 else s
    return x if keepdim else x.squeeze(-1)


class InvariantLinearMode(TorchFunctionMode):
    """Inside: F.linear without bias runs the invariant Triton GEMM, and a sum over the
    last dim (the router's top-k normalisation) is an ordered chain of adds. Used by
    spmd_moe.batch_invariant.rowwise on CUDA for per-token functions."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if b is None and wants(x) and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
                return linear(x, w)
        if func in (torch.Tensor.sum, torch.sum):
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            if isinstance(x, torch.Tensor) and wants(x) and x.is_floating_point() and dim in (-1, x.ndim - 1) and 0 < x.shape[-1] <= 64 \
                    and "dtype" not in kwargs:
                return ordered_sum_last(x, keepdim)
        return func(*args, **kwargs)
