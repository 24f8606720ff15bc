"""This rank's routed experts through vLLM's own CPU fused-experts op (the plugin on CPU).

Native vLLM on the CPU runs each MoE layer as: the router (a GEMM, softmax, top-k), one
``torch.ops._C.cpu_fused_moe`` call (gate/up GEMM, SiLU-and-mul, down GEMM and the
weighted sum over k for every token, one kernel), and the TP all-reduce. The plugin's
own path (``spmd_moe.replicated_decode``: sort, gathers, three grouped GEMMs over all
T*K slots, the weighting, the K terms all-reduced and summed) is about 40 small torch
ops per layer call, ~2.3x native's per-layer time at decode sizes on CPU.

Here the layer keeps its placements and its experts (EP = TP: rank r holds experts
[r*E/n, (r+1)*E/n)) and only the expert computation changes: every rank routes every
(replicated) token with the layer's own router, vLLM's op computes the weighted sum of
this rank's experts' slots for each token -- a Partial summand over the TP axis -- and
one all-reduce of [T, D] through the layer's communicator (vLLM's shared-memory one)
makes it Replicate. The shared experts' Partial sum (Qwen2-MoE) is added before that
same all-reduce.

The op takes [T, K] expert ids in [0, experts) and cannot skip a slot. At small T the
other ranks' slots go to one extra all-zero packed expert with weight 0 (output exactly
0) and [T, K] goes straight in; past a size set by the expert shape (the zero expert's
wasted GEMM rows against the compaction's fixed cost) only the (token, slot) pairs of this
rank's experts are passed, as rows of a top-1 problem, and their weighted outputs are
added back per token (``index_add_``). The packed weights are a second copy of this
rank's expert weights in vLLM's layout ([e+1, 2F', D] gate|up and [e+1, D, F'], F' = F
rounded up to the kernel's 32, zero padded: the padded hidden units are exactly 0).

Bits: not the split path's (a different GEMM kernel and summation order, vLLM's fast
exp in the SiLU): the output differs from spmd_moe's own path by fp32 rounding
(tests/test_vllm_experts.py: within 5e-6 of a float64 reference, measured 3.3e-7 like
spmd_moe's own path; greedy tokens equal native vLLM's and HF's). Debug mode, batch-
invariant mode, autograd, routing replay (forced or recorded routes) and anything the op
cannot take run spmd_moe's own path, which debug mode checks. ``SPMD_MOE_VLLM_EXPERTS=spmd``
turns this off (and saves the packed copy).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from spmd_moe import _debug
from spmd_moe import batch_invariant as _bi
from spmd_moe import collectives as C
from spmd_moe import tokens as _tokens
from spmd_moe.errors import ConfigError
from spmd_moe.placement import EP, Par, Placed, Rep, Var, unchecked_cast

if TYPE_CHECKING:
    from spmd_moe.experts import GroupedExperts
    from spmd_moe.integrations.vllm.model import SpmdMoEBlock
    from spmd_moe.moe import MoE

ENV = "SPMD_MOE_VLLM_EXPERTS"  # 'vllm' (default): vLLM's CPU fused-experts op; 'spmd': spmd_moe's own path
_ALIGN = 32  # cpu_fused_moe's 'vec' kernel: output and hidden sizes in multiples of 32
_DTYPES = (torch.float32, torch.bfloat16)
# The compaction's fixed cost (~25 us on a 2-core EPYC) in multiply-adds of the
# expert GEMMs it saves (~1e11 flop/s on one core): the zero expert is used while the
# other ranks' slots cost less than that.
_COMPACT_FLOPS = 2.5e6


def choice() -> str:
    """The expert computation the plugin's MoE layers use on CPU (``SPMD_MOE_VLLM_EXPERTS``)."""
    c = os.environ.get(ENV, "vllm")
    if c not in ("vllm", "spmd"):
        raise ConfigError(
            f"{ENV}: expected 'vllm' (vLLM's CPU fused-experts op for this rank's experts) or "
            f"'spmd' (spmd_moe's own grouped GEMMs), got {c!r}. Fix: unset it or use one of the two."
        )
    return c


def unusable_reason(moe: MoE[Any]) -> str | None:
    """Why vLLM's CPU op cannot compute this layer's experts (None: it can)."""
    cfg, w = moe.cfg, moe.experts.w1_EFD
    if w.device.type != "cpu":
        return f"device {w.device} (the op is vLLM's CPU kernel)"
    if w.dtype not in _DTYPES:
        return f"dtype {w.dtype}"
    if cfg.expert_dtype not in (None, w.dtype):
        return f"expert_dtype {cfg.expert_dtype} differs from the weights' {w.dtype}"
    if cfg.dim % _ALIGN:
        return f"hidden size {cfg.dim} not a multiple of {_ALIGN}"
    try:
        import vllm._custom_ops as ops  # noqa: F401
    except ImportError as e:  # pragma: no cover - the plugin runs inside vLLM
        return f"vllm._custom_ops: {e}"
    if not hasattr(torch.ops._C, "cpu_fused_moe"):
        return "this vLLM build has no torch.ops._C.cpu_fused_moe"
    return None


class CpuFusedExperts:
    """One layer's local experts packed for ``cpu_fused_moe`` (isa 'vec', any x86/Arm CPU)."""

    isa = "vec"

    def __init__(self, ex: GroupedExperts) -> None:
        from vllm._custom_ops import cpu_prepack_moe_weight

        self.start, self.num_local = ex.expert_start, ex.num_local_experts
        self.dtype = ex.w1_EFD.dtype  # the op computes in its inputs' dtype: x must have it
        w1, w2, w3 = ex.w1_EFD.detach(), ex.w2_EDF.detach(), ex.w3_EFD.detach()
        e, F, D = w1.shape
        Fp = -(-F // _ALIGN) * _ALIGN
        w13 = w1.new_zeros(e, 2 * Fp, D)
        w13[:, :F] = w1
        w13[:, Fp : Fp + F] = w3
        w2p = w2.new_zeros(e, D, Fp)
        w2p[:, :, :F] = w2
        # The parameters' versions when packed: an in-place change (load_weights, a
        # state dict load, weight updates) makes the packed copy stale (repacked).
        self._params = (ex.w1_EFD, ex.w2_EDF, ex.w3_EFD)
        self._versions = self.versions()
        # Global expert id -> local id, or num_local for other ranks' experts (and the
        # id E the split path gives pad tokens; not used here).
        E = ex.num_experts
        lut = torch.full((E + 1,), e, dtype=torch.int32, device=w1.device)
        lut[self.start : self.start + e] = torch.arange(e, dtype=torch.int32, device=w1.device)
        self.local_of_E = lut
        # One more expert of zeros (id e): at small T it takes the other ranks' slots
        # with weight 0 (its output is exactly 0), so [T, K] goes straight into the op;
        # its GEMMs cost one expert's work per such slot, so at large T the slots are
        # compacted instead (and the zero expert gets no rows: skipped by the op).
        self.w13 = cpu_prepack_moe_weight(torch.cat([w13, w13.new_zeros(1, 2 * Fp, D)]), self.isa)
        self.w2 = cpu_prepack_moe_weight(torch.cat([w2p, w2p.new_zeros(1, D, Fp)]), self.isa)
        keep = torch.zeros(E + 1, dtype=torch.float32, device=w1.device)
        keep[self.start : self.start + e] = 1.0
        self.keep_E = keep
        n = max(1, E // max(1, e))
        waste_per_slot = (n - 1) / n * 6 * D * Fp  # flops of a zero-expert slot, on average
        self.small_slots = int(_COMPACT_FLOPS / waste_per_slot) if n > 1 else 1 << 62
        self.one = torch.ones((), dtype=torch.float32, device=w1.device)  # the counters' increment

    def versions(self) -> tuple[int, int, int]:
        """The packed parameters' version counters now (in-place writes bump them)."""
        w1, w2, w3 = self._params
        return (w1._version, w2._version, w3._version)

    def __call__(
        self, x_TD: Float[Placed[Var[EP]], "T D"], weights_TK: Float[Placed[Var[EP]], "T K"],
        ids_TK: Int[Placed[Var[EP]], "T K"],
    ) -> Float[Placed[Par[EP]], "T D"]:
        """sum over this rank's slots k of weights[t, k] * expert_k(x[t]): the routed
        output's summand on this rank (other ranks' slots add nothing)."""
        T, D = x_TD.shape
        K = ids_TK.shape[1]
        if T * K <= self.small_slots:
            # Every slot into the op: other ranks' slots on the zero expert, weight 0
            # (w * 0.0 = 0 exactly; the router's weights are finite).
            y_TD = torch.empty((T, D), dtype=x_TD.dtype)
            torch.ops._C.cpu_fused_moe(
                y_TD, x_TD, self.w13, self.w2, None, None, weights_TK * self.keep_E[ids_TK],
                self.local_of_E[ids_TK], False, "silu", self.isa,
            )
        else:
            local_N = self.local_of_E[ids_TK.reshape(-1)]
            mine_M = (local_N < self.num_local).nonzero().squeeze(1)  # CPU: no device to sync with
            y_TD = x_TD.new_zeros(T, D)
            if mine_M.numel():
                tok_M = mine_M // K
                out_MD = torch.empty((mine_M.numel(), D), dtype=x_TD.dtype)
                torch.ops._C.cpu_fused_moe(
                    out_MD, x_TD.index_select(0, tok_M), self.w13, self.w2, None, None,
                    weights_TK.reshape(-1)[mine_M].float().unsqueeze(1), local_N[mine_M].unsqueeze(1),
                    False, "silu", self.isa,
                )
                y_TD.index_add_(0, tok_M, out_MD)
        return unchecked_cast(
            Placed[Par[EP]], y_TD,
            reason="this rank's experts' weighted slots: summed over the ranks they are the routed output",
        )


def applies(moe: SpmdMoEBlock, x_TD: torch.Tensor) -> bool:
    """Whether this layer call runs on vLLM's CPU op (see the module docstring)."""
    fused = moe.cpu_fused
    if fused is None or x_TD.shape[0] == 0 or _debug._enabled or _bi._enabled:
        return False
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return False
    if x_TD.dtype != fused.dtype or x_TD.device.type != "cpu":
        return False
    return moe.forced_routes_TK is None and not moe.record_routes


def forward(moe: SpmdMoEBlock, x_TD: Float[Placed[Rep[EP]], "T D"]) -> Float[Placed[Rep[EP]], "T D"]:
    """The layer on replicated tokens: route all, this rank's experts, one all-reduce."""
    pctx, tok = moe.pctx, moe.tokens
    n, r = pctx.size, pctx.rank
    T = x_TD.shape[0]
    fused = moe.cpu_fused
    assert fused is not None
    if fused._versions != fused.versions():  # weights written since packed: pack again
        fused = moe.cpu_fused = CpuFusedExperts(moe.experts)
    if n > 1 and T not in tok._checked_T and not _tokens._capturing():
        # spmd_moe's policy on every path: the metadata header once per (layer, T).
        tok.check_peers(T)
        if len(tok._checked_T) >= _tokens._MAX_CHECKED:
            tok._checked_T.clear()
        tok._checked_T.add(T)
    xv_TD: Placed[Var[EP]] = C.rank_view(x_TD, pctx)
    weights_TK, ids_TK, _ = moe.router(xv_TD, moe._expert_bias())
    # The load-balance counters count this rank's chunk of the tokens (as the split path).
    chunk = -(-T // n)
    lo, hi = min(T, r * chunk), min(T, (r + 1) * chunk)
    if hi > lo:  # (grad is off here: applies())
        moe.tokens_per_expert_E.index_put_((ids_TK[lo:hi].reshape(-1),), fused.one, accumulate=True)
    partial_TD = fused(xv_TD, weights_TK, ids_TK)
    if moe.shared_experts is not None:
        shared_TD: Placed[Par[EP]] = moe.shared_experts(x_TD)
        partial_TD = unchecked_cast(Placed[Par[EP]], partial_TD + shared_TD.to(partial_TD.dtype),
                                    reason="a sum of two Partial summands is one")
    return C.all_reduce(partial_TD, pctx, donate=True)
