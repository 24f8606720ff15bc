"""Fused decode path for one GPU: router, expert SwiGLU and combine in five kernels
(four at T=1: SLOT below).

For T <= MAX_T tokens on CUDA (inference, bf16 experts, one rank) the routed part of
the layer is

    gate              the gate GEMV in fp32, per (token, block of 16 experts), spread over
                      the SMs (one program per token would read the gate alone);
                      zeroes the plan counters
    route + plan      score function, top-k, renorm and scale, the K ids of each token
                      sorted ascending (the combine order of spmd_moe.moe), the
                      load-balance counter, and a plan: for each touched expert the
                      slots it serves (atomics: slot order inside an expert is
                      arbitrary, which does not change any row's arithmetic)
    up                per (touched expert, F block): x rows @ w1/w3 blocks, SwiGLU
    down              per (touched expert, D block): h rows @ w2 block
    combine           weights and the ordered sum (as spmd_moe._fused_combine)

Each weight byte of a touched expert is read once per call (the GEMV split over F and D
blocks across all SMs), no [T, K, D] fp32 temporaries, no host sync, so the whole thing
is capturable in a CUDA graph. Rounding follows the torch path (bf16 GEMM outputs, bf16
SwiGLU, bf16 combine), but the GEMMs' K order differs from cuBLAS: results agree with the
reference path to bf16 tolerance, not bitwise (tests/test_decode_kernels.py).

Not used for: autograd, debug mode, batch-invariant mode, more than one rank, forced or
recorded routes, group-limited routing, MoEConfig.kernels == "torchtitan".
"""

from __future__ import annotations

from typing import Any

import torch

MAX_T = 64  # one M tile covers an expert's rows: a token picks an expert at most once

# Tile sizes: F block of the up kernel and its D step; D block of the down kernel and its
# F step. Small output blocks spread one expert's weights over many SMs (the GEMV
# regime); measured on one H200 by spmd_moe.apps.bench.decode --sweep.
# (gate_e, optional: experts per gate-kernel program, 4 if absent.)
TILES: dict[str, int] = {"up_f": 32, "up_d": 128, "down_n": 64, "down_f": 128, "warps": 4, "stages": 3}  # T <= 16
TILES_LARGE_T: dict[str, int] = {"up_f": 64, "up_d": 64, "down_n": 64, "down_f": 64, "warps": 4, "stages": 3}

# The split variant for T <= SPLIT["max_t"] (variant "split" or "split_fused"; "tiled"
# = the kernels above at every T). Up: programs (expert, F block, D chunk) write fp32
# partials, summed in chunk order into SwiGLU (see "swiglu" below); down: programs
# (expert, D block, F chunk) write fp32 partials of y; the combine sums those in chunk order before it
# rounds. So each GEMM output is still one fp32 sum rounded once to bf16, in another
# K order (the same tolerance as the tiled kernels), and the result does not depend on
# which program runs first. "split_fused": the down program that completes a token's
# D block (an atomic counter) also does its combine: 4 kernels instead of 5. On the
# interpreter programs run one after another; the counters' memory ordering (acq_rel
# atomics after a CTA barrier, partials read past L1) is checked by the CUDA tests.
SPLIT: dict[str, Any] = {"variant": "tiled", "max_t": 4}
# swiglu "up": the up program completing an (expert, F block) (an atomic counter) sums
# the partials in chunk order and stores bf16 h rows; "down": every down program sums the
# partials of its F chunk itself (no counter; more L2 reads in its loop).
SPLIT_TILES: dict[str, Any] = {"up_f": 32, "up_d": 128, "up_split": 4, "down_n": 64, "down_f": 128, "down_split": 2,
                               "warps": 4, "stages": 3, "swiglu": "up", "gate_e": 4}

# pdl: programmatic dependent launch between the kernels (any variant; CUDA, sm90+): each
# kernel waits for its predecessor at its very start (before any memory access) and lets
# its successor launch once all its programs have started, so launch latency overlaps
# the predecessor's tail. The arithmetic is unchanged (bitwise, a CUDA test). On since
# session 6 (H200 run 3, alternating, graph replays: T=8 142.4 -> 140.0 us, T=64 329.6 ->
# 329.1, T=1 tiled 44.6 -> 43.2).
LAUNCH = {"pdl": True}

# The slot design, for T <= SLOT["max_t"] when SLOT["on"] (takes precedence over SPLIT):
# four kernels instead of five.
#     router   router_kernel: the gate GEMV as gate_kernel, and the last gate program of
#              each token (a per-token acq_rel counter, set back to 0 by that program)
#              routes it as route_kernel: the same ids and weights, no plan
#     up       per (slot t*K + k, F block): one dependent read (the id), then the weights
#              stream (the plan's chain of dependent reads is gone)
#     down     per (slot, D block): the same
#     combine  combine_kernel
# Each program runs the tiled kernels' tl.dot on its one row: with TILES' tiles, at T=1
# bitwise the tiled output. An expert picked by several tokens is read once per token, so
# this is for T = 1. H200 (run 3, one layer a graph replay / per layer of 8 in one graph):
# 42.3 / 34.9 us with PDL vs tiled 44.6 / 38.5 (tiled + PDL 43.2 / 36.6). The counters
# persist per device (_DONE): calls must not run concurrently on two streams of one device.
SLOT: dict[str, Any] = {"on": True, "max_t": 1}
SLOT_TILES: dict[str, int] = {"gate_e": 4, "up_f": 32, "up_d": 128, "down_n": 64, "down_f": 128, "warps": 4,
                              "stages": 3}
_DONE: dict[tuple[str, int | None], torch.Tensor] = {}

_kernels: dict[str, Any] | None = None
_tried = False


def _build() -> dict[str, Any] | None:
    global _kernels, _tried
    if _tried:
        return _kernels
    _tried = True
    try:
        import triton  # noqa: F401
    except ImportError:
        return None

    from spmd_moe.kernels import _decode_triton as k

    _kernels = {"gate": k.gate_kernel, "route": k.route_kernel, "up": k.up_kernel, "down": k.down_kernel,
                "combine": k.combine_kernel, "up_split": k.up_split_kernel, "down_split": k.down_split_kernel,
                "router": k.router_kernel, "up_slot": k.up_slot_kernel, "down_slot": k.down_slot_kernel}
    return _kernels


def _pdl_ok(dev: torch.device) -> bool:
    """Triton has the grid-dependency intrinsics and the card is sm90 or newer."""
    from spmd_moe.kernels import _decode_triton as k

    return bool(k.HAS_PDL) and torch.cuda.get_device_capability(dev)[0] >= 9


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def usable(x_TD: torch.Tensor, w1_EFD: torch.Tensor) -> bool:
    """CUDA (or Triton's interpreter), bf16 input and experts, T <= MAX_T, no autograd."""
    if x_TD.device.type == "cuda":
        if x_TD.dtype != torch.bfloat16 or w1_EFD.dtype != torch.bfloat16:
            return False
    elif not (_interpreting() and x_TD.dtype == w1_EFD.dtype == torch.float32):
        return False
    if not 0 < x_TD.shape[0] <= MAX_T or x_TD.shape[-1] % 16 or w1_EFD.shape[1] % 16:
        return False
    if torch.is_grad_enabled() and (x_TD.requires_grad or w1_EFD.requires_grad):
        return False
    return _build() is not None


def _interpreting() -> bool:
    """Triton's CPU interpreter, for tests that opt in (SPMD_MOE_DECODE_INTERPRET=1): it
    cannot load bf16, so they feed fp32 tensors holding bf16 values, and the kernels round
    to bf16 where the GPU path does. A plain fp32 layer never takes this path."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SPMD_MOE_DECODE_INTERPRET") == "1"


def routed_decode(
    x_TD: torch.Tensor,
    gate_w_ED: torch.Tensor,
    expert_bias_E: torch.Tensor | None,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    *,
    top_k: int,
    score_func: str,
    route_norm: bool,
    route_scale: float,
    tokens_per_expert_E: torch.Tensor,
    expert_start: int = 0,
    num_local: int | None = None,
    count_rows: tuple[int, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y_TD: the routed experts' weighted sum for every token. Adds the tokens each
    expert received to tokens_per_expert_E (float32, the layer's load-balance counter).

    Expert parallelism (defaults: everything, as on one rank): the router routes every
    token over all E = gate_w_ED.shape[0] experts, but only the experts
    [expert_start, expert_start + num_local) are computed; w1/w2/w3 hold just those
    (local index = id - expert_start) and slots of the other experts add exact zeros.
    count_rows=(lo, hi): only tokens lo <= t < hi add to tokens_per_expert_E (all E
    entries). out_dtype=torch.float32: the combine's fp32 sum, unrounded (for an
    all-reduce of partial sums); otherwise rounded as spmd_moe.moe's _weighted_sum."""
    ks = _build()
    assert ks is not None, "call usable() first"
    T, D = x_TD.shape
    E = gate_w_ED.shape[0]
    L, F, _ = w1_EFD.shape  # local experts
    if num_local is None:
        num_local = L
    assert num_local == L and 0 <= expert_start and expert_start + L <= E, (expert_start, num_local, L, E)
    lo, hi = count_rows if count_rows is not None else (0, T)
    assert 0 <= lo <= hi <= T, count_rows
    assert tokens_per_expert_E.shape == (E,) and tokens_per_expert_E.dtype == torch.float32
    K = top_k
    N = T * K  # slots
    dev = x_TD.device
    x_TD = x_TD.contiguous()
    rounded = out_dtype is None or out_dtype != torch.float32
    out_TD = torch.empty(T, D, dtype=out_dtype or x_TD.dtype, device=dev)
    pdl = bool(LAUNCH["pdl"] and dev.type == "cuda" and _pdl_ok(dev))
    pk: dict[str, Any] = {"PDL": True, "launch_pdl": True} if pdl else {}
    if SLOT["on"] and T <= SLOT["max_t"]:
        _slot_decode(ks, x_TD, gate_w_ED, expert_bias_E, w1_EFD, w2_EDF, w3_EFD, out_TD, tokens_per_expert_E,
                     K=K, score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                     expert_start=expert_start, lo=lo, hi=hi, rounded=rounded, pk=pk)
        return out_TD
    variant = SPLIT["variant"] if T <= SPLIT["max_t"] else "tiled"
    assert variant in ("tiled", "split", "split_fused"), variant
    fused = variant == "split_fused"
    tl_ = SPLIT_TILES if variant != "tiled" else TILES if T <= 16 else TILES_LARGE_T
    num_nb = triton_cdiv(D, tl_["down_n"])
    num_fb = triton_cdiv(F, tl_["up_f"])
    swiglu_up = variant != "tiled" and tl_["swiglu"] == "up"
    # int32 plan: count_L, n_uniq, the per-(local expert, F block) counters (swiglu "up"),
    # the per-(token, D block) counters (split_fused); zeroed by the gate kernel.
    n_ucnt = L * num_fb if swiglu_up else 0
    plan_n = L + 1 + n_ucnt + (T * num_nb if fused else 0)
    plan_i32 = torch.empty(plan_n, dtype=torch.int32, device=dev)
    count_L, nuniq = plan_i32[:L], plan_i32[L:L + 1]
    ucnt_LB, cnt_TB = plan_i32[L + 1:L + 1 + n_ucnt], plan_i32[L + 1 + n_ucnt:]
    need_T = torch.empty(T, dtype=torch.int32, device=dev)
    uniq_U = torch.empty(max(L, 1), dtype=torch.int32, device=dev)
    slot_LT = torch.empty(max(L, 1), T, dtype=torch.int32, device=dev)
    logits_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids_TK = torch.empty(T, K, dtype=torch.int32, device=dev)
    wts_TK = torch.empty(T, K, dtype=torch.float32, device=dev)
    bias = expert_bias_E if expert_bias_E is not None else wts_TK  # unread when HAS_BIAS is False
    bec = tl_.get("gate_e", 4)  # experts per gate program (a D loop of up to 4096/bec columns per step)
    n_gate = T * triton_cdiv(E, bec)
    ks["gate"][(T, triton_cdiv(E, bec))](
        x_TD, gate_w_ED.contiguous(), logits_TE, plan_i32, D, E, plan_n,
        BLOCK_EC=bec, BLOCK_D=min(4096 // bec, _pow2(D)), BLOCK_PLAN=max(16, _pow2(triton_cdiv(plan_n, n_gate))), num_warps=4,
        **pk,
    )
    ks["route"][(T,)](
        logits_TE, bias, ids_TK, wts_TK, count_L, nuniq, uniq_U, slot_LT, tokens_per_expert_E,
        T, E, float(route_scale), expert_start, L, lo, hi, need_T, out_TD, D,
        K=K, BLOCK_E=max(16, _pow2(E)),
        SIGMOID=score_func == "sigmoid", HAS_BIAS=expert_bias_E is not None, NORM=route_norm,
        FUSED_COMBINE=fused, num_warps=8, **pk,
    )
    bm = max(16, _pow2(T))
    u_max = min(T * K, L)
    launch = {"num_warps": tl_["warps"], "num_stages": tl_["stages"]}
    if variant == "tiled":
        y_ND = torch.empty(N, D, dtype=x_TD.dtype, device=dev)
        nsplit = 1
        if u_max > 0:
            h_NF = torch.empty(N, F, dtype=x_TD.dtype, device=dev)
            ks["up"][(u_max, triton_cdiv(F, tl_["up_f"]))](
                x_TD, w1_EFD, w3_EFD, h_NF, count_L, nuniq, uniq_U, slot_LT, T, D, F,
                K=K, BLOCK_M=bm, BLOCK_F=tl_["up_f"], BLOCK_D=tl_["up_d"], **launch, **pk,
            )
            ks["down"][(u_max, num_nb)](
                h_NF, w2_EDF, y_ND, count_L, nuniq, uniq_U, slot_LT, T, D, F,
                BLOCK_M=bm, BLOCK_N=tl_["down_n"], BLOCK_F=tl_["down_f"], **launch, **pk,
            )
    else:
        # Chunks: whole blocks each, so the number of chunks may come out below the ask.
        bd = min(tl_["up_d"], _pow2(D))
        d_chunk = triton_cdiv(triton_cdiv(D, tl_["up_split"]), bd) * bd
        ns_up = triton_cdiv(D, d_chunk)
        bf = min(tl_["down_f"], _pow2(F))
        f_chunk = triton_cdiv(triton_cdiv(F, tl_["down_split"]), bf) * bf
        nsplit = triton_cdiv(F, f_chunk)
        p_SNF = torch.empty(2 * ns_up, N, F, dtype=torch.float32, device=dev)  # w1 then w3 partials
        h_NF = torch.empty(N if swiglu_up else 1, F, dtype=x_TD.dtype, device=dev)
        y_ND = torch.empty(nsplit, N, D, dtype=torch.float32, device=dev)
        if u_max > 0:
            ks["up_split"][(u_max, num_fb, ns_up)](
                x_TD, w1_EFD, w3_EFD, p_SNF, h_NF, ucnt_LB, count_L, nuniq, uniq_U, slot_LT, T, D, F, N, d_chunk,
                K=K, BLOCK_M=bm, BLOCK_F=tl_["up_f"], BLOCK_D=bd, NSPLIT=ns_up, SWIGLU_HERE=swiglu_up, **launch, **pk,
            )
            ks["down_split"][(u_max, num_nb, nsplit)](
                p_SNF, h_NF, w2_EDF, y_ND, out_TD, wts_TK, ids_TK, cnt_TB, need_T,
                count_L, nuniq, uniq_U, slot_LT, T, D, F, N, f_chunk, num_nb, expert_start, L,
                K=K, BLOCK_M=bm, BLOCK_N=tl_["down_n"], BLOCK_F=bf, NSPLIT_UP=ns_up, NSPLIT=nsplit,
                FUSED_COMBINE=fused, ROUND=rounded, H_FROM_PARTIALS=not swiglu_up, **launch, **pk,
            )
    if not fused:
        block = 1024 if D >= 1024 else max(16, _pow2(D))
        ks["combine"][(T, triton_cdiv(D, block))](
            out_TD, y_ND, wts_TK, ids_TK, expert_start, L, D, N, K=K, BLOCK_D=block, ROUND=rounded, NSPLIT=nsplit,
            **pk,
        )
    return out_TD


def _router(
    ks: dict[str, Any], x_TD: torch.Tensor, gate_w_ED: torch.Tensor, expert_bias_E: torch.Tensor | None,
    bias: torch.Tensor, logits_TE: torch.Tensor, ids_TK: torch.Tensor, wts_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor, *, K: int, score_func: str, route_norm: bool, route_scale: float,
    lo: int, hi: int, bec: int, pk: dict[str, Any],
) -> None:
    """router_kernel: ids and weights in slot order, the load-balance counter."""
    T, D = x_TD.shape
    E = gate_w_ED.shape[0]
    ks["router"][(T, triton_cdiv(E, bec))](
        x_TD, gate_w_ED.contiguous(), logits_TE, _done_counters(x_TD.device), bias, ids_TK, wts_TK,
        tokens_per_expert_E, D, E, float(route_scale), lo, hi,
        K=K, BLOCK_EC=bec, BLOCK_D=min(4096 // bec, _pow2(D)), BLOCK_E=max(16, _pow2(E)),
        SIGMOID=score_func == "sigmoid", HAS_BIAS=expert_bias_E is not None, NORM=route_norm, num_warps=4, **pk,
    )


def _done_counters(dev: torch.device) -> torch.Tensor:
    """The slot router's per-token counters on dev: zeroed once here, then set back to 0
    by the kernel that used them (so a CUDA graph replays with no memset node)."""
    key = (dev.type, dev.index)
    if key not in _DONE:
        _DONE[key] = torch.zeros(MAX_T, dtype=torch.int32, device=dev)
    return _DONE[key]


def _slot_decode(
    ks: dict[str, Any], x_TD: torch.Tensor, gate_w_ED: torch.Tensor, expert_bias_E: torch.Tensor | None,
    w1_EFD: torch.Tensor, w2_EDF: torch.Tensor, w3_EFD: torch.Tensor, out_TD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor, *, K: int, score_func: str, route_norm: bool, route_scale: float,
    expert_start: int, lo: int, hi: int, rounded: bool, pk: dict[str, Any],
) -> None:
    """The slot design (see SLOT): router, up and down per slot, combine; writes out_TD."""
    T, D = x_TD.shape
    E = gate_w_ED.shape[0]
    L, F, _ = w1_EFD.shape
    dev = x_TD.device
    tl_ = SLOT_TILES
    launch = {"num_warps": tl_["warps"], "num_stages": tl_["stages"]}
    logits_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids_TK = torch.empty(T, K, dtype=torch.int32, device=dev)
    wts_TK = torch.empty(T, K, dtype=torch.float32, device=dev)
    h_NF = torch.empty(T * K, F, dtype=x_TD.dtype, device=dev)
    y_ND = torch.empty(T * K, D, dtype=x_TD.dtype, device=dev)
    bias = expert_bias_E if expert_bias_E is not None else wts_TK  # unread when HAS_BIAS is False
    _router(ks, x_TD, gate_w_ED, expert_bias_E, bias, logits_TE, ids_TK, wts_TK, tokens_per_expert_E,
            K=K, score_func=score_func, route_norm=route_norm, route_scale=route_scale, lo=lo, hi=hi,
            bec=tl_["gate_e"], pk=pk)
    ks["up_slot"][(T * K, triton_cdiv(F, tl_["up_f"]))](
        x_TD, w1_EFD, w3_EFD, h_NF, ids_TK, D, F, expert_start, L,
        K=K, BLOCK_F=tl_["up_f"], BLOCK_D=tl_["up_d"], **launch, **pk,
    )
    ks["down_slot"][(T * K, triton_cdiv(D, tl_["down_n"]))](
        h_NF, w2_EDF, y_ND, ids_TK, D, F, expert_start, L,
        BLOCK_N=tl_["down_n"], BLOCK_F=tl_["down_f"], **launch, **pk,
    )
    block = 1024 if D >= 1024 else max(16, _pow2(D))
    ks["combine"][(T, triton_cdiv(D, block))](
        out_TD, y_ND, wts_TK, ids_TK, expert_start, L, D, T * K, K=K, BLOCK_D=block, ROUND=rounded, NSPLIT=1, **pk,
    )


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
