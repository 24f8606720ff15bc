"""Triton kernel of spmd_moe.kernels.fast_route (imported only when Triton is present)."""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl

from spmd_moe.kernels._triton_common import route_scores, route_topk


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, ids_ptr, wts_ptr, T, E, route_scale,
    K: tl.constexpr, BLOCK_E: tl.constexpr, TOKENS: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    """TOKENS tokens per program, one after another: each token's scores from its fp32
    logits, top-k, gate values (route_scores, route_topk), stored at the chosen expert's
    rank in ascending id: ids_TK (int64) and weights_TK (fp32) come out sorted by id."""
    e_off = tl.arange(0, BLOCK_E)
    in_e = e_off < E
    for i in range(TOKENS):
        t = tl.program_id(0).to(tl.int64) * TOKENS + i
        t_E = e_off * 0 + t  # (a vector: the interpreter rejects a scalar-broadcast mask)
        live = in_e & (t_E < T)
        # (a tail program's tokens past T: zeros, routed and not stored)
        logits = tl.where(in_e, tl.load(logits_ptr + t * E + e_off, mask=live, other=0.0), float("-inf"))
        scores = route_scores(logits, in_e, SIGMOID)
        sel, w, k_pos = route_topk(scores, e_off, in_e, bias_ptr, route_scale, K, HAS_BIAS, NORM)
        tl.store(ids_ptr + t * K + k_pos, e_off.to(tl.int64), mask=sel & live)
        tl.store(wts_ptr + t * K + k_pos, w, mask=sel & live)
