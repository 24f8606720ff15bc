"""Layout 'replicated' without autograd (vLLM's decode): one all-reduce per layer.

Every rank already holds every token (Rep). Instead of splitting them (R -> V),
all-gathering the rows and expert ids back (V -> R), reduce-scattering the per-slot
outputs (P -> V) and all-gathering the layer's output (V -> R) -- four collectives --
every rank routes every token, runs its own experts on the slots that chose them,
weights each slot, and one all-reduce (P -> R) sums the weighted slots (each has exactly
one owner; the others add exact zeros) together with the shared experts' partial sums.
Each rank then adds up the K terms of every token in ascending expert order.

Bits: the router runs once per rank chunk (the GEMM shapes of the split path), the
expert GEMMs see the rows of the all-gather dispatcher in its order, each term is the
same fp32-weighted product rounded the same way, and the sum over k runs in the same
order: the output equals the split path's (AllGatherDispatcher) bit for bit. The shared
experts' partial sums are added by the all-reduce rather than a reduce-scatter: the
same two-term sum at n = 2; at n > 2 the backend's all-reduce order (tested at 4 gloo
ranks).

No host sync at decode sizes once a token count T has been seen (its metadata header is
exchanged once per layer and T, as on the split path): the sizes are host integers known
from T and n, the counts are a scatter_add, and the only collective is the
communicator's all-reduce (vLLM's shared-memory one on CPU, its capturable pynccl /
custom all-reduce on CUDA).

Used when MoEConfig.dispatcher is 'auto', layout 'replicated'/'invariant', n > 1,
autograd off, debug off (debug mode runs the checked split path, which this equals),
no forced routes, and T/n within decode_max_tokens (or the communicator's
``replicated_max_tokens`` hint: VllmComm takes this path at every T). Past
decode_max_tokens, on a communicator that is not capturable (CPU), it runs the experts
on exactly their rows (one host sync, as the all_to_all path) and equals the all_to_all
(prefill) path bit for bit: the same rows reach each expert in the same order, the router
sees the same chunks. On a capturable one (CUDA) it stays sync-free at every size and
equals the all-gather dispatcher's computation (the same GEMM with a zeroed tail); there
it is also taken up to spmd_moe.kernels.decode.MAX_T tokens per rank (past
decode_max_tokens), so a decode step at those sizes makes no host sync eagerly either
(the split path would pick the all-to-all dispatcher and read its split sizes).

Fused kernels (MoEConfig.kernels == 'fast', on CUDA, T <= MAX_T, bf16, batch-invariant
mode off, no recorded routes): every rank runs spmd_moe.kernels.decode.routed_decode on
all T tokens with only its own experts computed (expert_start/num_local) and gets the
fp32 partial sum over its slots (out_dtype=float32; other ranks' slots are exact zeros);
the shared experts' partial is added in fp32, ONE all-reduce of [T, D] fp32 (P -> R)
sums the ranks, and the sum is rounded once to the layer dtype. The counter counts only
this rank's chunk of the tokens (count_rows), as the split path does: every rank routes
every token, so counting all T on every rank would make the global count n times too
large. Not bitwise the one-GPU kernel path (which rounds each term and sums in bf16) nor
the torch path: tests state the tolerance. kernels='torchtitan' and batch-invariant mode
keep the bitwise path above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float

from spmd_moe import _debug
from spmd_moe import batch_invariant as _bi
from spmd_moe import collectives as C
from spmd_moe import tokens as _tokens
from spmd_moe.dispatch.base import count_ids
from spmd_moe.kernels import decode as _dk
from spmd_moe.placement import EP, Par, Placed, Rep, Var, unchecked_cast

if TYPE_CHECKING:
    from spmd_moe.moe import MoE


def applies(moe: MoE[Any], T: int) -> bool:
    """Whether the replicated all-reduce path runs for a [T, D] replicated input."""
    n = moe.pctx.size
    if n == 1 or T == 0 or moe.cfg.dispatcher != "auto" or _debug._enabled:
        return False
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return False
    if moe.forced_routes_TK is not None:
        return False
    if _bi._enabled and n > 2 and moe.shared_experts is not None:
        return False  # the shared experts' sum must be rank-ordered there
    # The communicator may say up to which size the all-reduce beats the all-to-all path
    # (vLLM's CPU shared-memory all-reduce: always, its all-to-all runs on gloo).
    comm = moe.pctx.comm
    limit = getattr(comm, "replicated_max_tokens", None)
    if limit is None:
        limit = moe.cfg.decode_max_tokens
        if comm is not None and comm.capturable:
            # CUDA: past decode_max_tokens the split path would take the all-to-all
            # dispatcher (a host read of its split sizes); this path stays sync-free.
            limit = max(limit, _dk.MAX_T)
    return -(-T // n) <= int(limit)


def fused_applies(moe: MoE[Any], x_TD: torch.Tensor) -> bool:
    """spmd_moe.kernels.decode at n > 1 (the conditions of MoE._decode_kernel_applies
    but the rank count): kernels 'fast', no batch-invariant/debug mode, plain top-k
    routing, no forced or recorded routes, and the kernels usable on x_TD (CUDA bf16,
    T <= MAX_T, no autograd)."""
    cfg = moe.cfg
    if cfg.kernels != "fast" or _debug._enabled or _bi._enabled:
        return False
    if moe.forced_routes_TK is not None or moe.record_routes or cfg.num_expert_groups is not None:
        return False
    if cfg.expert_dtype not in (None, x_TD.dtype):
        return False
    return _dk.usable(x_TD, moe.experts.w1_EFD)


def forward(moe: MoE[Any], x_TD: Float[Placed[Rep[EP]], "T D"]) -> Float[Placed[Rep[EP]], "T D"]:
    """The layer on replicated tokens, one all-reduce (see the module docstring)."""
    pctx, cfg, tok = moe.pctx, moe.cfg, moe.tokens
    n, r = pctx.size, pctx.rank
    T, D = x_TD.shape
    K, E = cfg.top_k, cfg.num_experts
    T_pad = -(-T // n) * n
    T_loc = T_pad // n
    if T not in tok._checked_T and not _tokens._capturing():
        # The split path's policy: the metadata header once per (layer, T), never inside
        # a CUDA graph capture (one host sync; vLLM's warm-up runs every captured size).
        tok.check_peers(T)
        if len(tok._checked_T) >= _tokens._MAX_CHECKED:
            tok._checked_T.clear()
        tok._checked_T.add(T)
    if T_pad > T:  # the split path's policy, whichever kernels run
        tok.require_padding(f"token count T={T}", f"remainder {T % n}", T_pad)
    if fused_applies(moe, x_TD):
        return _forward_fused(moe, x_TD, T_loc)
    x_all_TD = x_TD
    if T_pad > T:
        x_all_TD = F.pad(x_TD, (0, 0, 0, T_pad - T))  # zero rows appended: still Rep
    # Every rank routes every token; it keeps the rows of its own experts (R -> V).
    xv_TD: Placed[Var[EP]] = C.rank_view(x_all_TD, pctx)
    bias_E = moe._expert_bias()
    if _bi._enabled:  # the router is row-wise there: one call gives the chunks' bits
        weights_TK, ids_TK, _ = moe.router(xv_TD, bias_E)
    else:
        # One call per rank chunk that holds a real token (the split path's GEMM shapes,
        # so its bits); chunks of pad rows only (T < n) are not routed.
        live = -(-T // T_loc)
        parts = [moe.router(xv_TD[q * T_loc : (q + 1) * T_loc], bias_E) for q in range(live)]
        weights_TK = torch.cat([p[0] for p in parts]) if live > 1 else parts[0][0]
        ids_TK = torch.cat([p[1] for p in parts]) if live > 1 else parts[0][1]
    if T_pad > T:
        # Pad tokens: expert id E (never local, never counted) and weight 0 (their slots
        # are exact zeros whatever the weight: the split path's bits).
        ids_TK = F.pad(ids_TK[:T], (0, 0, 0, T_pad - T), value=E)
        weights_TK = F.pad(weights_TK[:T], (0, 0, 0, T_pad - T))
    mine = slice(r * T_loc, (r + 1) * T_loc)  # this rank's chunk: what the split path counts
    if moe.record_routes:  # the router's k order, as MoE._routed records
        moe.recorded_routes.append(ids_TK[mine][: max(0, min(T_loc, T - r * T_loc))].detach().clone())
    ids_TK, k_order_TK = ids_TK.sort(dim=-1)  # ascending expert id: the sum's order
    weights_TK = weights_TK.gather(-1, k_order_TK)
    # The all-gather dispatcher's rows in its order: local experts' slots first.
    ex = moe.experts
    e, start = ex.num_local_experts, ex.expert_start
    local_TK = ids_TK - start
    key_N = torch.where((local_TK >= 0) & (local_TK < e), local_TK, e).reshape(-1)
    order_N = torch.argsort(key_N, stable=True)
    counts_e = count_ids(key_N, e + 1)[:e]
    comm = pctx.comm
    if T_loc <= cfg.decode_max_tokens or (comm is not None and comm.capturable):
        # Decode sizes, or a communicator that may be captured in a CUDA graph (vLLM
        # captures decode batches of many sizes): the all-gather dispatcher's GEMM (every
        # slot, zeros past the counts), no host sync.
        out_RD = ex(xv_TD[order_N // K], counts_e, rows_exact=False)
        slots_ND = torch.empty_like(out_RD).index_copy_(0, order_N, out_RD)
    else:
        # Prefill sizes on a host-side communicator (CPU): exactly the local rows, the
        # all-to-all path's GEMM shapes (CPU grouped GEMMs round differently with a zero
        # tail), at the price of that path's one host sync.
        mine_R = order_N[: int(counts_e.sum())]
        out_RD = ex(xv_TD[mine_R // K], counts_e, rows_exact=True)
        slots_ND = out_RD.new_zeros(T_pad * K, D).index_copy_(0, mine_R, out_RD)
    slots_TKD = unchecked_cast(
        Placed[Var[EP]], slots_ND.view(T_pad, K, D),
        reason="this rank's expert outputs, moved to their slots within the rank",
    )
    terms_TKD = weighted_terms(slots_TKD, weights_TK)  # other ranks' slots: exact zeros
    moe._count(ids_TK[mine])
    y_TD: Placed[Rep[EP]]
    if moe.shared_experts is not None:
        shared_TD: Placed[Par[EP]] = moe.shared_experts(x_all_TD)
        if shared_TD.dtype == terms_TKD.dtype:
            # One all-reduce for both: the K weighted slots and the shared partial sum.
            both_TKD = torch.cat([C.partial_from_shards(terms_TKD, pctx), shared_TD.unsqueeze(1)], dim=1)
            summed_TKD = C.all_reduce(both_TKD, pctx, donate=True)
            y_TD = sum_terms(summed_TKD[:, :K]) + summed_TKD[:, K]
        else:
            summed_TKD = C.all_reduce(C.partial_from_shards(terms_TKD, pctx), pctx, donate=True)
            y_TD = sum_terms(summed_TKD) + C.all_reduce(shared_TD, pctx, donate=True)
    else:
        y_TD = sum_terms(C.all_reduce(C.partial_from_shards(terms_TKD, pctx), pctx, donate=True))
    return y_TD[:T] if T_pad > T else y_TD


def _forward_fused(moe: MoE[Any], x_TD: Float[Placed[Rep[EP]], "T D"], T_loc: int) -> Float[Placed[Rep[EP]], "T D"]:
    """The fused decode kernels on this rank's experts, one fp32 all-reduce of [T, D]."""
    pctx, cfg, ex = moe.pctx, moe.cfg, moe.experts
    T = x_TD.shape[0]
    r = pctx.rank
    # This rank's chunk of the (padded) tokens: what the split path counts here.
    lo, hi = min(r * T_loc, T), min((r + 1) * T_loc, T)
    part = _dk.routed_decode(
        x_TD, moe.router.gate.weight, moe._expert_bias(), ex.w1_EFD, ex.w2_EDF, ex.w3_EFD,
        top_k=cfg.top_k, score_func=cfg.score_func, route_norm=cfg.route_norm, route_scale=cfg.route_scale,
        tokens_per_expert_E=moe.tokens_per_expert_E,
        expert_start=ex.expert_start, num_local=ex.num_local_experts, count_rows=(lo, hi), out_dtype=torch.float32,
    )
    part_TD = unchecked_cast(
        Placed[Par[EP]], part,
        reason="the weighted sum over this rank's experts' slots (others' slots: exact zeros): a summand of the output",
    )
    if moe.shared_experts is not None:
        shared_TD: Placed[Par[EP]] = moe.shared_experts(x_TD)
        part_TD = part_TD + shared_TD.float()  # in fp32: one rounding after the sum
    y_TD: Placed[Rep[EP]] = C.all_reduce(part_TD, pctx, donate=True)
    return y_TD.to(x_TD.dtype)


def weighted_terms(
    slots_TKD: Float[Placed[Var[EP]], "T K D"], weights_TK: Float[Placed[Var[EP]], "T K"]
) -> Float[Placed[Var[EP]], "T K D"]:
    """w[t,k] * slot[t,k] weighted in fp32 and rounded to the slot dtype per term: the
    terms of spmd_moe.moe._weighted_sum (elementwise, so the bits do not depend on the
    batch; a test holds the two paths bitwise equal)."""
    w_TK1 = weights_TK.float().unsqueeze(-1)
    if slots_TKD.dtype in (torch.bfloat16, torch.float16):
        # bf16 * fp32 promotes to fp32: the same fp32 products, with no fp32 copy of the
        # slots; without autograd, one kernel that also rounds on store.
        if torch.is_grad_enabled() and (slots_TKD.requires_grad or w_TK1.requires_grad):
            return (slots_TKD * w_TK1).to(slots_TKD.dtype)
        return torch.mul(slots_TKD, w_TK1, out=torch.empty_like(slots_TKD))
    return (slots_TKD.float() * w_TK1).to(slots_TKD.dtype)


def sum_terms(terms_TKD: Float[Placed[Rep[EP]], "T K D"]) -> Float[Placed[Rep[EP]], "T D"]:
    """The sum over k in ascending k (= ascending expert id), one add at a time: the
    order of spmd_moe.moe._weighted_sum."""
    terms = terms_TKD.unbind(1)
    acc_TD = terms[0]
    for term_TD in terms[1:]:
        acc_TD = acc_TD + term_TD
    return acc_TD

