"""Prefill up projection on CUDA: one grouped GEMM that gathers its own A rows and applies
SwiGLU in its epilogue (inference, kernels='fast', one rank).

    h_RF[r] = silu(x_TD[t] @ w1_EFD[e].T) * (x_TD[t] @ w3_EFD[e].T),  t = slots_R[r] // K

for the expert-sorted slots of the local dispatcher (counts_e rows per expert), in one
Triton kernel where the unfused path runs a gather of x (T*K rows of D), two cutlass
grouped GEMMs (bf16 [R, F] outputs each) and the SwiGLU kernel. The tile -> expert map is
computed in the kernel from the device counts (no host read; the grid is the worst case,
cdiv(R, BM) + E row tiles), so the path stays capturable in a CUDA graph.

Rounding: each fp32 accumulator is rounded to bf16 as the grouped GEMMs' outputs are, then
SwiGLU runs with the unfused kernel's arithmetic (``swiglu_math``). What differs from the
unfused path is only the GEMMs' fp32 summation order over D (cutlass's against Triton's
tiles): not bitwise; tests/test_gather_gemm.py states the tolerance. So it is used only
where ``applies`` says so: kernels='fast', no autograd recording, batch-invariant and debug
mode off, bf16 on CUDA (or fp32 under the tests' interpreter opt-in), Triton present,
GATHER_GEMM on (env SPMD_MOE_GATHER_GEMM=0 turns it off). Training and kernels='torchtitan'
keep the gather and the grouped GEMMs (bitwise torchtitan).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import spmd_types as spmd
import torch
from jaxtyping import Float, Int

from spmd_moe import _debug
from spmd_moe.kernels import _lazy
from spmd_moe import batch_invariant as _bi
from spmd_moe.placement import EP, Placed, Var, unchecked_cast

# False: the gather + grouped GEMMs + SwiGLU kernel (the prefill bench's side-by-side switch).
GATHER_GEMM: bool = os.environ.get("SPMD_MOE_GATHER_GEMM", "1") != "0"

# Tile shape (rows BM of one expert, BN columns of F for each of w1 and w3, BK of D a step),
# warps, pipeline stages, and whether the weight tiles come by TMA (Hopper's tensor memory
# accelerator; the x rows cannot: they are gathered). Chosen on one H200 by
# scripts/gpu/gather_gemm.sh (T=32768: 2.97 ms against 3.33 for TMA with BK=64, 3.74 without
# TMA, and 3.40 for what it replaces).
LAUNCH: dict[str, int] = {"BM": 128, "BN": 128, "BK": 32, "warps": 8, "stages": 5, "tma": 1}


def _build() -> Any:
    """The kernel module, or None without Triton (imported once, on first use)."""
    return _lazy.load("_gather_gemm_triton")


def _interpreting() -> bool:
    """The tests' interpreter opt-in (SPMD_MOE_GATHER_GEMM_INTERPRET=1): fp32 tensors holding
    bf16 values."""
    return _lazy.interpreting("SPMD_MOE_GATHER_GEMM_INTERPRET")


def applies(kernels: str, x_TD: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor) -> bool:
    """Whether the fused up projection replaces gather + grouped GEMMs + SwiGLU on x_TD."""
    if not GATHER_GEMM or kernels != "fast":
        return False
    if torch.is_grad_enabled() and (x_TD.requires_grad or w1_EFD.requires_grad or w3_EFD.requires_grad):
        return False  # training: the autograd path (bitwise torchtitan)
    if x_TD.device.type == "cuda":
        # Hopper or newer: measured there (on older GPUs the cutlass path is not either).
        ok = x_TD.dtype == w1_EFD.dtype == w3_EFD.dtype == torch.bfloat16 and _sm90(x_TD.device)
    else:
        ok = x_TD.dtype == w1_EFD.dtype == w3_EFD.dtype == torch.float32 and _interpreting()
    if not ok or _bi._enabled or _debug._enabled or spmd.is_type_checking():
        return False
    return _build() is not None


@functools.cache
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def gathered_swiglu(
    x_TD: Float[Placed[Var[EP]], "T D"],
    slots_R: Int[Placed[Var[EP]], " R"],
    counts_e: Int[Placed[Var[EP]], " e"],
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    top_k: int,
    *,
    launch: dict[str, int] | None = None,
    bf16_math: bool | None = None,
) -> Float[Placed[Var[EP]], "R F"]:
    """h_RF for the R expert-sorted slots slots_R (token t*K + k; counts_e[e] of them for
    local expert e, in expert order; sum(counts_e) == R), in x's dtype. bf16_math: round
    where the bf16 path rounds (None: x is bf16; the interpreter tests pass True with fp32
    tensors holding bf16 values). launch: a LAUNCH-like tile shape (the GPU script's sweep)."""
    ks = _build()
    assert ks is not None, "call applies() first"
    cfg = LAUNCH if launch is None else launch
    T, D = x_TD.shape
    e, F, Dw = w1_EFD.shape
    R = slots_R.shape[0]
    assert Dw == D and w3_EFD.shape == w1_EFD.shape and counts_e.shape == (e,), (x_TD.shape, w1_EFD.shape, counts_e.shape)
    h_RF = x_TD.new_empty(R, F)
    if R == 0 or e == 0:
        return unchecked_cast(Placed[Var[EP]], h_RF, reason="no rows on this rank")
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    # Worst case: every expert's last tile partly filled, cdiv(R, BM) + e tiles.
    grid = (((R + bm - 1) // bm + e) * ((F + bn - 1) // bn),)
    w1, w3 = w1_EFD.contiguous(), w3_EFD.contiguous()
    # TMA: the weight tiles by [E * F, D] descriptors in [BN, BK] blocks (16-byte row strides).
    if cfg.get("tma") and D * w1.element_size() % 16 == 0:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kernel = ks.gather_swiglu_tma_kernel
        w1_arg: Any = TensorDescriptor.from_tensor(w1.view(e * F, D), [bn, bk])
        w3_arg: Any = TensorDescriptor.from_tensor(w3.view(e * F, D), [bn, bk])
    else:
        kernel, w1_arg, w3_arg = ks.gather_swiglu_kernel, w1, w3
    kernel[grid](
        h_RF, x_TD.contiguous(), slots_R.contiguous(), counts_e.contiguous(), w1_arg, w3_arg, D, F, e, top_k,
        BM=bm, BN=bn, BK=bk, E_P2=max(16, 1 << (e - 1).bit_length()), EVEN_K=D % bk == 0,
        ROUND=x_TD.dtype == torch.bfloat16 if bf16_math is None else bf16_math,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return unchecked_cast(Placed[Var[EP]], h_RF, reason="per-rank GEMMs of this rank's tokens and experts")
