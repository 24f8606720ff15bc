"""Fused combine for inference on CUDA (one Triton kernel), bitwise equal to the
unfused path ``_weighted_sum(scatter_to_slots(rows, sent_slots, T*K))`` of spmd_moe.moe:

    term_k = round_bf16(fp32(row of slot (t, k)) * w[t, k])     (unsent slot: row = 0)
    y[t]   = round_bf16(...round_bf16(term_0 + term_1) ... + term_{K-1})

in ascending k, each add rounded to bf16 as torch's bf16 add does. The unfused path writes
the T*K*D slots, a weighted copy of them and K-1 partial sums; this kernel reads each
expert row once (gathered through the inverse permutation) and writes T*D.

Used only without autograd (no backward here), for bf16 on CUDA with Triton present.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int

from spmd_moe.placement import EP, Placed, Var, unchecked_cast

_kernel: Any = None
_tried = False
slot_row: Any = None  # spmd_moe.kernels._triton_common.slot_row once _build ran


def _build() -> Any:
    global _kernel, _tried, slot_row
    if _tried:
        return _kernel
    _tried = True
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    from spmd_moe.kernels._triton_common import slot_row  # a global (the interpreter sees no closure)

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def combine_kernel(  # type: ignore[no-untyped-def, unused-ignore]
        out_ptr, rows_ptr, row_of_slot_ptr, w_ptr, D,
        K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs < D
        x0, w0, _ = slot_row(rows_ptr, row_of_slot_ptr, w_ptr, t, 0, K, D, offs, in_d)
        acc = (x0 * w0).to(tl.bfloat16).to(tl.float32)
        for k in tl.static_range(1, K):
            x, w, _ = slot_row(rows_ptr, row_of_slot_ptr, w_ptr, t, k, K, D, offs, in_d)
            term = (x * w).to(tl.bfloat16).to(tl.float32)  # an unsent slot: 0 * w, as torch's
            acc = (acc + term).to(tl.bfloat16).to(tl.float32)
        tl.store(out_ptr + t * D + offs, acc.to(tl.bfloat16), mask=in_d)

    _kernel = combine_kernel
    return _kernel


def usable(rows_RD: torch.Tensor, weights_TK: torch.Tensor) -> bool:
    """Whether the fused kernel applies: CUDA, bf16 rows, no autograd, Triton present."""
    if rows_RD.device.type != "cuda" or rows_RD.dtype != torch.bfloat16:
        return False
    if torch.is_grad_enabled() and (rows_RD.requires_grad or weights_TK.requires_grad):
        return False
    return _build() is not None


def weighted_combine(
    rows_RD: Float[Placed[Var[EP]], "R D"], sent_slots_R: Int[Placed[Var[EP]], " R"], weights_TK: Float[Placed[Var[EP]], "T K"]
) -> Float[Placed[Var[EP]], "T D"]:
    """y[t] = sum_k w[t,k] * row(slot t*K+k), rows_RD[i] belonging to slot sent_slots_R[i]."""
    kernel = _build()
    T, K = weights_TK.shape
    D = rows_RD.shape[-1]
    if sent_slots_R.shape[0] == T * K:  # every slot sent: a permutation fills it
        row_of_slot_N = torch.empty(T * K, dtype=torch.int64, device=rows_RD.device)
    else:
        row_of_slot_N = torch.full((T * K,), -1, dtype=torch.int64, device=rows_RD.device)
    row_of_slot_N.index_copy_(0, sent_slots_R, torch.arange(sent_slots_R.shape[0], device=rows_RD.device))
    w_TK = weights_TK.float().contiguous()
    out_TD = torch.empty(T, D, dtype=rows_RD.dtype, device=rows_RD.device)
    if T > 0 and D > 0:
        block = 1024 if D >= 1024 else max(16, 1 << (D - 1).bit_length())
        kernel[(T, (D + block - 1) // block)](out_TD, rows_RD.contiguous(), row_of_slot_N, w_TK, D, K=K, BLOCK_D=block)
    return unchecked_cast(Placed[Var[EP]], out_TD, reason="combine + weighted sum of this rank's rows, in one kernel")
