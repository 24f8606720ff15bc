"""spmd_moe.kernels.decode (fused router + experts + combine for decode on one GPU)
against the torch path (MoEConfig.kernels='torchtitan') and a float64 loop.

On CUDA the kernels run in bf16. On CPU they run in Triton's interpreter, which cannot
load bf16: there the tests feed fp32 tensors that hold bf16 values, and the kernels
round to bf16 wherever the GPU path does, so the same arithmetic is checked.

Tolerance: the kernels' GEMMs sum over D (or F) in another order than the torch GEMMs,
so the bf16-rounded GEMM outputs can differ by one bf16 ulp (2^-8 relative) and that
carries through SwiGLU, the down projection and the combine: we allow 3 bf16 ulps of the
output's scale (3 * 2^-8 * max|y|) against the torch path, and against the float64
loop (which rounds nothing) 6 ulps. Routing is compared exactly (the per-expert counts);
the random inputs leave no near-ties at fp32 resolution.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import spmd_moe as sm
from spmd_moe.kernels import decode as dk

ON_CUDA = torch.cuda.is_available()


def _interp_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Triton reads TRITON_INTERPRET when it is first imported, which in a pytest process has
# long happened: on CPU this file re-runs itself in a fresh interpreter with it set.
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SPMD_MOE_DECODE_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not ON_CUDA and not _interp_ok(), reason="needs CUDA or Triton's interpreter")
kernel_test = pytest.mark.skipif(not ON_CUDA and not IN_INTERPRETER, reason="runs in the subprocess below")

D, F, E, K = 64, 32, 16, 4


@pytest.mark.skipif(ON_CUDA or IN_INTERPRETER, reason="CPU only, once")
def test_kernels_in_triton_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", SPMD_MOE_DECODE_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def _dev_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if ON_CUDA else ("cpu", torch.float32)


def _pair(score_func: str, route_norm: bool, bias: bool, shared: bool) -> tuple[sm.MoE, sm.MoE]:
    """(fast, reference): the same weights; the reference runs the torch path in bf16,
    the fast one the kernels (in fp32 tensors holding bf16 values on the interpreter)."""
    dev, dt = _dev_dtype()
    out = []
    for kernels, pdt in (("fast", dt), ("torchtitan", torch.bfloat16)):
        cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func=score_func,  # type: ignore[arg-type]
                           route_norm=route_norm, route_scale=1.5 if score_func == "sigmoid" else 1.0,
                           load_balance_coeff=1e-3 if bias else None, shared_hidden_dim=32 if shared else None,
                           param_dtype=pdt, kernels=kernels)  # type: ignore[arg-type]
        out.append(sm.MoE(cfg, device=dev))
    fast, ref = out
    ref.init_states(seed=7, std=0.3)
    if bias:
        assert ref.expert_bias_E is not None
        ref.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E, device=dev))
    fast.load_state_dict(ref.state_dict())  # bf16 -> fp32 is exact
    return fast, ref


def _run(fast: sm.MoE, ref: sm.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return fast(x), ref(x.to(torch.bfloat16))


def _x(T: int, seed: int = 0) -> torch.Tensor:
    dev, dt = _dev_dtype()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(torch.bfloat16).to(dt).to(dev)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) * 2.0**-8
    return float((a.double() - b.double()).abs().max()) / scale


@kernel_test
@pytest.mark.parametrize("T", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("variant", ["softmax", "softmax_norm_bias", "sigmoid_norm_shared"])
def test_fast_decode_matches_torch_path(T: int, variant: str) -> None:
    score = "sigmoid" if variant.startswith("sigmoid") else "softmax"
    fast, ref = _pair(score, "norm" in variant, "bias" in variant, "shared" in variant)
    x = _x(T, seed=T)
    with torch.no_grad():
        assert fast._decode_kernel_applies(x) and not ref._decode_kernel_applies(x)
    y_fast, y_ref = _run(fast, ref, x)
    assert torch.equal(fast.tokens_per_expert_E, ref.tokens_per_expert_E), "routing differs"
    assert float(fast.tokens_per_expert_E.sum()) == T * K
    assert _ulps(y_fast, y_ref) <= 3.0, f"{_ulps(y_fast, y_ref):.2f} bf16 ulps from the torch path"


@kernel_test
def test_fast_decode_matches_float64_loop() -> None:
    fast, _ = _pair("softmax", True, False, False)
    T = 9
    x = _x(T, seed=3)
    with torch.no_grad():
        y = fast(x).double().cpu()
        xd = x.double().cpu()
        w_ED = fast.router.gate.weight.double().cpu()
        s_TE = torch.softmax(xd @ w_ED.T, -1)
        top = s_TE.topk(K, -1)
        wts = top.values / top.values.sum(-1, keepdim=True)
        ex = fast.experts
        w1, w2, w3 = (w.double().cpu() for w in (ex.w1_EFD, ex.w2_EDF, ex.w3_EFD))
        ref = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for k in range(K):
                e = int(top.indices[t, k])
                h = torch.nn.functional.silu(xd[t] @ w1[e].T) * (xd[t] @ w3[e].T)
                ref[t] += wts[t, k] * (h @ w2[e].T)
    assert _ulps(y, ref) <= 6.0


@kernel_test
def test_all_tokens_one_expert_and_idle_experts() -> None:
    """A bias that forces every token onto the same K experts: one expert takes T rows,
    all others none."""
    fast, ref = _pair("sigmoid", True, True, False)
    for m in (fast, ref):
        assert m.expert_bias_E is not None
        m.expert_bias_E.zero_()
        m.expert_bias_E[:K] = 100.0
    x = _x(64, seed=5)
    y_fast, y_ref = _run(fast, ref, x)
    assert fast.tokens_per_expert_E[:K].tolist() == [64.0] * K
    assert _ulps(y_fast, y_ref) <= 3.0


@kernel_test
def test_not_used_where_it_does_not_apply() -> None:
    fast, _ = _pair("softmax", False, False, False)
    with torch.no_grad():
        assert fast._decode_kernel_applies(_x(dk.MAX_T))
        assert not fast._decode_kernel_applies(_x(dk.MAX_T + 1))  # prefill sizes: grouped GEMMs
        with sm.debug():
            assert not fast._decode_kernel_applies(_x(4))  # debug mode checks the torch path
    assert not fast._decode_kernel_applies(_x(4))  # training: autograd needs the torch path


@kernel_test
def test_nan_token_still_routes_to_k_distinct_experts() -> None:
    """A NaN input (debug mode off) must not break the plan: its token goes to K distinct
    experts (its output is NaN), the other tokens are unaffected."""
    fast, ref = _pair("softmax", True, False, False)
    x = _x(6, seed=9)
    x[2] = float("nan")
    with torch.no_grad():
        y = fast(x)
    assert float(fast.tokens_per_expert_E.sum()) == 6 * K
    assert int(fast.tokens_per_expert_E.max()) <= 6
    assert bool(torch.isnan(y[2]).all())
    keep = [0, 1, 3, 4, 5]
    _, y_ref = _run(fast, ref, x[keep])
    assert _ulps(y[keep], y_ref) <= 3.0


def test_fp32_layer_never_takes_the_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the tests' opt-in lets the interpreter run fp32 tensors as bf16 stand-ins."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPMD_MOE_DECODE_INTERPRET", raising=False)
    with torch.no_grad():
        assert not dk.usable(torch.randn(4, 64), torch.randn(8, 32, 64))


try:  # a one-op kernel around the kernels' rounding helper (module level: Triton resolves globals)
    import triton
    import triton.language as tl

    from spmd_moe.kernels._decode_triton import rn_bf16

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def _round_kernel(a_ptr, o_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def, unused-ignore]
        r = tl.arange(0, N)
        tl.store(o_ptr + r, rn_bf16(tl.load(a_ptr + r)))
except ImportError:
    pass


@kernel_test
def test_rn_bf16_rounds_like_torch_nan_and_inf_included() -> None:
    """The kernels' bf16 rounding by hand equals torch's cast (nearest even), and a NaN
    with every mantissa bit set (the GPU's default NaN) stays NaN instead of carrying into
    the sign bit."""
    dev, _ = _dev_dtype()
    special = torch.tensor([0x7FFFFFFF, 0x7FC00000, -1, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0, -2147483648],
                           dtype=torch.int32).view(torch.float32)
    a = torch.cat([special, torch.randn(1016, generator=torch.Generator().manual_seed(0)) * 100]).to(dev)
    o = torch.empty_like(a)
    _round_kernel[(1,)](a, o, N=1024)
    ref = a.to(torch.bfloat16).float()
    same = (o == ref) | (torch.isnan(o) & torch.isnan(ref))
    assert bool(same.all()), f"{int((~same).sum())} of 1024 values round differently"
