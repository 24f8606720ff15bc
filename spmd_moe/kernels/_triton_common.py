"""Triton helpers shared by the kernels of several modules (imported only where Triton is
present). A @triton.jit helper is inlined into its caller: sharing one changes no
kernel's arithmetic, only where its source is written."""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl


@triton.jit
def route_scores(logits, in_e, SIGMOID: tl.constexpr):
    """One token's fp32 scores from its logits (-inf on the lanes outside in_e): sigmoid,
    or softmax over the lanes in_e; 0 outside in_e."""
    if SIGMOID:
        scores = tl.where(in_e, tl.sigmoid(logits), 0.0)
    else:
        mx = tl.max(logits, axis=0)
        p = tl.where(in_e, tl.exp(logits - mx), 0.0)
        scores = p / tl.sum(p, axis=0)
    return scores


@triton.jit
def route_topk(
    scores, e_off, in_e, bias_ptr, route_scale, K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
):
    """The top-k of one token's scores + bias over the lanes e_off (experts where in_e),
    ties to the lowest id; gate values from the unbiased scores, renormalised (NORM) and
    scaled. Returns (sel: the K chosen lanes, w: their gate values (0 elsewhere), k_pos:
    the slot of a chosen lane, its rank in ascending id (the combine's order))."""
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e_off, mask=in_e, other=0.0).to(tl.float32)
    # NaN (a broken input) ranks as -inf: K distinct experts are always chosen.
    choice = tl.where(in_e & (choice == choice), choice, float("-inf"))
    # Above the K-th largest value, plus as many of the values equal to it as are still
    # needed, lowest id first (a sort in registers; no serial loop over k).
    kth = tl.sum(tl.where(e_off == K - 1, tl.sort(choice, descending=True), 0.0), axis=0)
    above = choice > kth
    tie = choice == kth
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    sel = (above | (tie & (tie_rank <= K - tl.sum(above.to(tl.int32), axis=0)))) & in_e
    w = tl.where(sel, scores, 0.0)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    w = w * route_scale
    k_pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    return sel, w, k_pos


@triton.jit
def slot_row(rows_ptr, row_of_slot_ptr, w_ptr, t, k, K: tl.constexpr, D, offs, in_d):
    """Slot k of token t, read through the inverse slot map (row_of_slot[t*K + k], int32
    or int64; -1 for a slot without a row): (the row's columns offs as fp32, 0 where it
    has none; its gate value w[t*K + k]; whether it has a row, as a vector like offs (the
    interpreter takes no scalar masks))."""
    r = tl.load(row_of_slot_ptr + t * K + k).to(tl.int64)
    w = tl.load(w_ptr + t * K + k)
    has_row = offs * 0 + r >= 0
    x = tl.load(rows_ptr + r * D + offs, mask=in_d & has_row, other=0.0).to(tl.float32)
    return x, w, has_row


@triton.jit
def plan_hits(ids_ptr, t, in_t, j, E_LOCAL, K: tl.constexpr, KP: tl.constexpr):
    """The fixed-size exchange's plan: which tokens t (ids [T, K], id // E_LOCAL = rank)
    have an expert on rank j."""
    ks = tl.arange(0, KP)
    ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * K + ks[None, :], mask=in_t[:, None] & (ks < K)[None, :], other=-1)
    return (tl.max(((ids >= 0) & (ids // E_LOCAL == j)).to(tl.int32), axis=1) > 0) & in_t
