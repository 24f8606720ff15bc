"""spmd_moe.replicated_decode at n > 1 (layout 'replicated', inference, dispatcher 'auto'):
real gloo groups of 2 and 4 ranks.

* Sync-free at decode sizes past decode_max_tokens on a capturable communicator (NCCL):
  with the group's communicator marked capturable (what TorchComm says on NCCL), the
  one-all-reduce path is taken up to spmd_moe.kernels.decode.MAX_T tokens per rank, makes
  no host read after the first call of a T (every .tolist/.item/bool/int/float of a tensor
  counted) and equals the all-gather dispatcher's path bit for bit (the same GEMM rows in
  the same order, the same rounding). On a host-side communicator (gloo as it is) the
  limit stays decode_max_tokens.

* The fused decode kernels (MoEConfig.kernels='fast') at n > 1, in Triton's interpreter
  (fp32 tensors holding bf16 values, as tests/test_decode_kernels.py; this file re-runs
  itself in a subprocess with TRITON_INTERPRET=1 SPMD_MOE_DECODE_INTERPRET=1): every rank
  computes its own experts' fp32 partial sum, one all-reduce, one rounding.
  - output against a float64 loop over the single-device weights: <= 6 bf16 ulps of
    max|y| (test_decode_kernels' bound for the one-GPU kernels: the kernels round the
    GEMM outputs and SwiGLU to bf16 as the torch path does, so a term carries a few bf16
    roundings; the float64 loop rounds nothing);
  - output against the one-rank fused kernels on the same tokens: <= 3 bf16 ulps of
    max|y|. Not bitwise: the one-rank kernel rounds every weighted term and every add
    to bf16 in ascending expert order; here the ranks' terms are summed in fp32 and
    rounded once (and the shared experts' partial is added in fp32 before that rounding);
  - the same bits on every rank (the all-reduce result);
  - the load-balance counter: summed over ranks it equals the one-rank count exactly and
    totals T*K, each rank counts only its own chunk of the tokens. Every rank routes every
    token here, so counting all T on every rank would make the global count n times too
    large (the trap of vLLM #3622's kind): asserted not to happen;
  - not used with kernels='torchtitan', in batch-invariant mode, in debug mode, with
    recorded routes, or with autograd: those keep the bitwise torch path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist

import spmd_moe as sm
from dist_utils import run_distributed
from spmd_moe.checkpoint import shard_state_dict

ON_CUDA = torch.cuda.is_available()
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SPMD_MOE_DECODE_INTERPRET") == "1"
D, F_HID, E, K, S_HID = 64, 32, 16, 4, 32
VARIANTS = {
    "softmax_norm": dict(score_func="softmax", route_norm=True),
    "sigmoid_scale_bias_shared": dict(score_func="sigmoid", route_norm=True, route_scale=1.5,
                                      load_balance_coeff=1e-3, shared_hidden_dim=S_HID),
}


def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cfg(**kw: Any) -> sm.MoEConfig:
    base: dict[str, Any] = dict(dim=D, hidden_dim=F_HID, num_experts=E, top_k=K, padding="pad")
    base.update(kw)
    return sm.MoEConfig(**base)


def _full(cfg: sm.MoEConfig, seed: int) -> sm.MoE:
    """The single-device layer, weights (and bias) rounded to bf16 values held in fp32."""
    full = sm.MoE(cfg, layout="replicated")
    full.init_states(seed, std=0.3)
    with torch.no_grad():
        if full.expert_bias_E is not None:
            full.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E))
        for p in full.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return full


def _sharded(cfg: sm.MoEConfig, full: sm.MoE, pctx: sm.ParallelContext[Any]) -> sm.MoE:
    m = sm.MoE(cfg, pctx, layout="replicated")
    m.load_state_dict(shard_state_dict(full.state_dict(), cfg, pctx))
    return m


def _x(T: int, seed: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).float()


class _HostReads:
    """Counts every torch.Tensor method that brings a value to the host."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")

    def __enter__(self) -> dict[str, int]:
        self.counts: dict[str, int] = {}
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, orig in self.saved.items():
            def f(t: torch.Tensor, *a: Any, _n: str = name, _o: Any = orig, **kw: Any) -> Any:
                self.counts[_n] = self.counts.get(_n, 0) + 1
                return _o(t, *a, **kw)
            setattr(torch.Tensor, name, f)
        return self.counts

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, orig)


# ------------------------------------------------------------------ capturable communicator
def capturable_worker(rank: int, n: int) -> list[str]:
    from spmd_moe import replicated_decode as rd
    from spmd_moe.kernels import decode as dk

    pctx = sm.ParallelContext.from_group(dist.group.WORLD, "tp")
    bad: list[str] = []
    cfg_kw = dict(score_func="sigmoid", route_norm=True, shared_hidden_dim=S_HID)
    full = _full(_cfg(**cfg_kw), 3)
    auto = _sharded(_cfg(**cfg_kw), full, pctx)
    ref = _sharded(_cfg(dispatcher="all_gather", **cfg_kw), full, pctx)
    big = n * dk.MAX_T
    with torch.inference_mode():
        # gloo as it is: host-side, decode_max_tokens (16) per rank is the limit.
        if rd.applies(auto, 16 * n + 1) or not rd.applies(auto, 16 * n):
            bad.append("host-side communicator: the limit is not decode_max_tokens per rank")
        assert pctx.comm is not None
        setattr(pctx.comm, "capturable", True)  # what TorchComm says on an NCCL group
        if not rd.applies(auto, big) or rd.applies(auto, big + 1):
            bad.append(f"capturable communicator: the limit is not MAX_T={dk.MAX_T} per rank")
        for T in (16 * n + 1, 40 * n - 1, big):
            x = _x(T, 100 + T)
            auto(x)  # first call of this T: the metadata header (one host read)
            with _HostReads() as reads:
                y = auto(x)
            if reads:
                bad.append(f"T={T}: host reads after the first call: {reads}")
            y_ref = ref(x)
            if not torch.equal(y, y_ref):
                bad.append(f"T={T}: differs from the all-gather dispatcher (max |d| {float((y - y_ref).abs().max()):.3g})")
    return bad


@pytest.mark.parametrize("world", [2, 4])
def test_capturable_comm_takes_the_sync_free_path_past_decode_max_tokens(world: int) -> None:
    results = run_distributed(capturable_worker, world, timeout=300, pg_timeout=120)
    bad = [f"rank {r}: {b}" for r, bs in enumerate(results) for b in bs]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ fused kernels (interpreter)
def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) * 2.0**-8
    return float((a.double() - b.double()).abs().max()) / scale


def _float64_layer(full: sm.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_TD, counts_E) of the single-device weights in float64, one token at a time."""
    cfg = full.cfg
    sd = {k: v.double() for k, v in full.state_dict().items()}
    xd = x.double()
    logits = xd @ sd["router.gate.weight"].T
    scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, -1)
    choice = scores + sd["expert_bias_E"] if "expert_bias_E" in sd and cfg.load_balance_coeff is not None else scores
    ids = choice.topk(cfg.top_k, -1).indices
    w = scores.gather(-1, ids)
    if cfg.route_norm:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.route_scale
    pre = "routed_experts.inner_experts."
    w1, w2, w3 = sd[pre + "w1_EFD"], sd[pre + "w2_EDF"], sd[pre + "w3_EFD"]
    y = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            e = int(ids[t, k])
            h = torch.nn.functional.silu(xd[t] @ w1[e].T) * (xd[t] @ w3[e].T)
            y[t] += w[t, k] * (h @ w2[e].T)
    if cfg.shared_hidden_dim:
        h = torch.nn.functional.silu(xd @ sd["shared_experts.w1.weight"].T) * (xd @ sd["shared_experts.w3.weight"].T)
        y += h @ sd["shared_experts.w2.weight"].T
    counts = torch.zeros(cfg.num_experts, dtype=torch.float64).scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.float64))
    return y, counts


def fused_worker(rank: int, n: int, variant: str, Ts: tuple[int, ...]) -> dict[str, Any]:
    from spmd_moe import replicated_decode as rd
    from spmd_moe.kernels import decode as dk

    pctx = sm.ParallelContext.from_group(dist.group.WORLD, "tp")
    assert pctx.comm is not None
    setattr(pctx.comm, "replicated_max_tokens", dk.MAX_T)  # as VllmComm: this path up to MAX_T tokens per rank
    cfg = _cfg(**VARIANTS[variant])
    full = _full(cfg, 7)
    m = _sharded(cfg, full, pctx)
    out: dict[str, Any] = {"T": {}, "gates": {}}
    with torch.inference_mode():
        for T in Ts:
            x = _x(T, 1000 + T)
            m.tokens_per_expert_E.zero_()
            full.tokens_per_expert_E.zero_()
            out["T"][T] = {
                "applies": rd.applies(m, T) and rd.fused_applies(m, x),
                "y": m(x).clone(),
                "counts": m.tokens_per_expert_E.clone(),
                "y_1rank": full(x).clone(),  # the one-rank fused kernels
                "counts_1rank": full.tokens_per_expert_E.clone(),
                "ref": _float64_layer(full, x),
            }
        x = _x(5, 1)
        g = out["gates"]
        g["fast"] = rd.fused_applies(m, x)
        m.record_routes = True
        g["record_routes"] = rd.fused_applies(m, x)
        m.record_routes = False
        with sm.batch_invariant_mode():
            g["batch_invariant"] = rd.fused_applies(m, x)
        with sm.debug():
            g["debug"] = rd.fused_applies(m, x)
        tt = _sharded(_cfg(kernels="torchtitan", **VARIANTS[variant]), full, pctx)
        g["torchtitan"] = rd.fused_applies(tt, x)
    g["autograd"] = rd.fused_applies(m, x.clone().requires_grad_(True))
    return out


kernel_test = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the Triton-interpreter subprocess below")


@pytest.mark.skipif(ON_CUDA or IN_INTERPRETER or not _triton(), reason="CPU with Triton only, once")
def test_fused_path_in_triton_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", SPMD_MOE_DECODE_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "fused_kernels"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout


@kernel_test
@pytest.mark.parametrize("world,variant,Ts", [
    (2, "softmax_norm", (1, 8, 17, 64)),  # T=1 < n: rank 1's chunk is empty; 17: padded
    (2, "sigmoid_scale_bias_shared", (3, 64)),
    (4, "sigmoid_scale_bias_shared", (6, 33)),
])
def test_fused_kernels_across_ranks(world: int, variant: str, Ts: tuple[int, ...]) -> None:
    results = run_distributed(fused_worker, world, variant, Ts, timeout=600, pg_timeout=300)
    for T in Ts:
        rs = [res["T"][T] for res in results]
        r0 = rs[0]
        assert all(r["applies"] for r in rs), f"T={T}: the fused path does not apply"
        for r, res in enumerate(rs[1:], 1):
            assert torch.equal(res["y"], r0["y"]), f"T={T}: rank {r}'s output differs from rank 0's"
        y_ref, counts_ref = r0["ref"]
        assert _ulps(r0["y"], y_ref) <= 6.0, f"T={T}: {_ulps(r0['y'], y_ref):.2f} bf16 ulps from the float64 loop"
        assert _ulps(r0["y"], r0["y_1rank"]) <= 3.0, f"T={T}: {_ulps(r0['y'], r0['y_1rank']):.2f} bf16 ulps from one rank"
        # The counter: one rank's count exactly (and the float64 routing), T*K in all
        # (not world*T*K), each rank its own chunk only.
        total = sum(r["counts"] for r in rs)
        assert torch.equal(r0["counts_1rank"], counts_ref.float()), f"T={T}: one-rank routing differs from float64"
        assert torch.equal(total, r0["counts_1rank"]), f"T={T}: global count {total.tolist()} != one rank's {r0['counts_1rank'].tolist()}"
        assert float(total.sum()) == T * K
        T_loc = -(-T // world)
        for r, res in enumerate(rs):
            lo, hi = min(r * T_loc, T), min((r + 1) * T_loc, T)
            assert float(res["counts"].sum()) == (hi - lo) * K, f"T={T} rank {r}: counted {float(res['counts'].sum())} slots, its chunk has {(hi - lo) * K}"
    gates = results[0]["gates"]
    assert gates["fast"], "the fused path should apply to kernels='fast' inference"
    assert not any(gates[k] for k in ("record_routes", "batch_invariant", "debug", "torchtitan", "autograd")), gates
