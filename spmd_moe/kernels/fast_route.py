"""Fast inference router on CUDA: the gate GEMM in bf16 with fp32 output, then one Triton
kernel for everything after it.

    logits_TE   x_TD @ w_ED.T, bf16 operands, fp32 accumulate and output (torch.mm with
                out_dtype: tensor cores; no fp32 copy of x). A bf16 x bf16 product is exact
                in fp32, so the logits are the torch router's up to the fp32 summation
                over D (order, and the tensor cores' truncating accumulation: within
                D * 2^-23 * sum|x w|; routes can differ only at near-ties of that size).
                Fallback where out_dtype is missing: the torch router's fp32 GEMM
    route       per token: softmax|sigmoid, + expert bias, top-k (ties to the lowest id;
                NaN ranks as -inf), renorm, scale: weights_TK fp32 and ids_TK int64
                ALREADY in ascending expert id, the combine's order (spmd_moe.moe skips
                its per-token sort and the gather of the gate values). Two kernels, the
                same experts (tests/test_fast_route.py): "rows" (default) routes a tile of
                tokens with K rounds of a row max; "topk" one token at a time with
                route_scores / route_topk of _triton_common (a sort of its E lanes, as the
                decode kernels: more work per token). Opt-in "fused": the gate GEMM inside
                the rows kernel (tl.dot), no logits in memory. All timed side by side in
                scripts/gpu/prefill_fwd.sh

It replaces the fp32 router GEMM, the x.float() copy, torch.topk, the gathers and the
per-token sort (~0.8 ms of a 6 ms prefill forward at T=32768 on one H200). Not bitwise
the torch router (summation orders of the GEMM, the softmax and the renorm differ by
fp32 ulps; tests/test_fast_route.py states the tolerances), so it is used only where
``applies`` says so: kernels='fast', inference (no autograd recording), debug and
batch-invariant mode off, no expert groups, bf16 input and gate on CUDA (or fp32 under the
tests' interpreter opt-in), Triton present, FAST_ROUTER on (env SPMD_MOE_FAST_ROUTER=0
turns it off). kernels='torchtitan' and training keep the torch router, bitwise.
"""

from __future__ import annotations

import os
from typing import Any

import spmd_types as spmd
import torch
import torch.nn.functional as F

from spmd_moe import _debug
from spmd_moe.kernels import _lazy
from spmd_moe import batch_invariant as _bi

# False: the torch router everywhere (the prefill bench's side-by-side switch).
FAST_ROUTER: bool = os.environ.get("SPMD_MOE_FAST_ROUTER", "1") != "0"

# The route kernel: "rows" (route_rows_kernel: a tile of block_t tokens, K rounds of a
# row max; default) or "topk" (route_kernel: route_topk's sort per token, `tokens` tokens
# per program, one after another); its warps. The same experts either way.
# "fused" (gate_route_kernel, opt-in): the gate GEMM in the same kernel (tiles of
# fused_t tokens, fused_d columns a step), no logits in memory.
LAUNCH: dict[str, Any] = {"kernel": "rows", "block_t": 16, "tokens": 4, "warps": 1, "rows_warps": 4,
                          "fused_t": 64, "fused_d": 64, "fused_warps": 8, "fused_stages": 3}

# Whether torch.mm(..., out_dtype=torch.float32) runs on bf16 CUDA tensors (aten::mm.dtype);
# None until the first call tries it.
_mm_dtype_ok: bool | None = None


def _build() -> Any:
    """The kernel module, or None without Triton (imported once, on first use)."""
    return _lazy.load("_fast_route_triton")


def _interpreting() -> bool:
    """The tests' interpreter opt-in (SPMD_MOE_FAST_ROUTE_INTERPRET=1): fp32 tensors holding
    bf16 values."""
    return _lazy.interpreting("SPMD_MOE_FAST_ROUTE_INTERPRET")


def applies(kernels: str, x_TD: torch.Tensor, w_ED: torch.Tensor, *, groups: bool) -> bool:
    """Whether the fast router replaces the torch router on x_TD (see the module
    docstring). ``groups``: the config limits routing to expert groups (not supported)."""
    if not FAST_ROUTER or kernels != "fast" or groups:
        return False
    if torch.is_grad_enabled() and (x_TD.requires_grad or w_ED.requires_grad):
        return False  # training: the torch router (gate gradient, bitwise torchtitan)
    if x_TD.device.type == "cuda":
        ok = x_TD.dtype == w_ED.dtype == torch.bfloat16
    else:
        ok = x_TD.dtype == w_ED.dtype == torch.float32 and _interpreting()
    if not ok or _bi._enabled or _debug._enabled or spmd.is_type_checking():
        return False
    return _build() is not None


def logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """fp32 [T, E] logits: a bf16 GEMM with fp32 output on CUDA, else the fp32 GEMM."""
    global _mm_dtype_ok
    if x_TD.device.type == "cuda" and x_TD.dtype == torch.bfloat16 and _mm_dtype_ok is not False:
        try:
            out = torch.mm(x_TD, w_ED.t(), out_dtype=torch.float32)
            _mm_dtype_ok = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            if _mm_dtype_ok:  # worked before: a real error, not a missing overload
                raise
            _mm_dtype_ok = False
    return F.linear(x_TD.float(), w_ED.float())


def route_logits(
    logits_TE: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, score_func: str, route_norm: bool,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK fp32, ids_TK int64) from fp32 logits, in ascending expert id per token."""
    ks = _build()
    assert ks is not None, "call applies() first"
    assert logits_TE.dtype == torch.float32 and logits_TE.ndim == 2, (logits_TE.dtype, logits_TE.shape)
    T, E = logits_TE.shape
    assert 0 < top_k <= E, (top_k, E)
    logits_TE = logits_TE.contiguous()
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    wts_TK = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    if T == 0:
        return wts_TK, ids_TK
    if bias_E is not None:
        assert bias_E.shape == (E,), (bias_E.shape, E)
        bias_E = bias_E.contiguous()
    args = (logits_TE, bias_E if bias_E is not None else logits_TE, ids_TK, wts_TK, T, E, float(route_scale))
    flags = {"K": top_k, "BLOCK_E": max(16, 1 << (E - 1).bit_length()), "SIGMOID": score_func == "sigmoid",
             "HAS_BIAS": bias_E is not None, "NORM": route_norm}
    if LAUNCH["kernel"] == "rows":
        bt = LAUNCH["block_t"]
        ks.route_rows_kernel[(triton_cdiv(T, bt),)](*args, BLOCK_T=bt, **flags, num_warps=LAUNCH["rows_warps"])
    else:
        tok = LAUNCH["tokens"]
        ks.route_kernel[(triton_cdiv(T, tok),)](*args, TOKENS=tok, **flags, num_warps=LAUNCH["warps"])
    return wts_TK, ids_TK


def route(
    x_TD: torch.Tensor, w_ED: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, score_func: str,
    route_norm: bool, route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK fp32, ids_TK int64), ids ascending per token: the GEMM, then the kernel
    (LAUNCH["kernel"] "fused": one kernel for both)."""
    if LAUNCH["kernel"] == "fused":
        return _gate_route(x_TD, w_ED, bias_E, top_k=top_k, score_func=score_func, route_norm=route_norm,
                           route_scale=route_scale)
    return route_logits(logits(x_TD, w_ED), bias_E, top_k=top_k, score_func=score_func, route_norm=route_norm,
                        route_scale=route_scale)


def _gate_route(
    x_TD: torch.Tensor, w_ED: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, score_func: str,
    route_norm: bool, route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """route() in one kernel (gate_route_kernel)."""
    ks = _build()
    assert ks is not None, "call applies() first"
    T, D = x_TD.shape
    E = w_ED.shape[0]
    assert 0 < top_k <= E and w_ED.shape[1] == D, (top_k, w_ED.shape, D)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=x_TD.device)
    wts_TK = torch.empty(T, top_k, dtype=torch.float32, device=x_TD.device)
    if T == 0:
        return wts_TK, ids_TK
    if bias_E is not None:
        assert bias_E.shape == (E,), (bias_E.shape, E)
        bias_E = bias_E.contiguous()
    bt, bd = LAUNCH["fused_t"], LAUNCH["fused_d"]
    ks.gate_route_kernel[(triton_cdiv(T, bt),)](
        x_TD.contiguous(), w_ED.contiguous(), bias_E if bias_E is not None else wts_TK, ids_TK, wts_TK, T, E, D,
        float(route_scale), K=top_k, BLOCK_T=bt, BLOCK_E=max(16, 1 << (E - 1).bit_length()), BLOCK_D=bd,
        SIGMOID=score_func == "sigmoid", HAS_BIAS=bias_E is not None, NORM=route_norm,
        IEEE=x_TD.dtype == torch.float32, num_warps=LAUNCH["fused_warps"], num_stages=LAUNCH["fused_stages"],
    )
    return wts_TK, ids_TK


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
