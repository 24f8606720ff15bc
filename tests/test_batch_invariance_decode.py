"""The invariant kernels' one-rank decode form (spmd_moe.kernels.invariant_gemm.routed_decode)
gives a token the same bits as the general invariant path does at large T and under
autograd.

The decode form (T <= DECODE_MAX_T, inference, one rank) runs six launches: the gate GEMM,
a route kernel that also writes a device-side plan, the fused up + SwiGLU and the down
GEMM over the touched experts only, the combine. The general path runs the router
(same gate GEMM and route kernel, no plan), the dispatcher, the same up and down kernels
over grouped rows, and the fused or torch combine. The claim is bitwise: a probe token's
output must be torch.equal whichever path ran and whatever else is in its batch.

Checked in Triton's interpreter on CPU (fp32; the interpreter cannot load bf16) and, with
`-k cuda`, on a GPU in bf16 and fp32. Controls: the decode form is really taken at small
T and not at large T or under autograd (counted), and the results stay close to the
normal (non-invariant) mode, so both paths computing the same wrong thing would fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import spmd_moe as sm
from spmd_moe.batch_invariant import batch_invariant

_has_triton = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_bits(moe: sm.MoE[Any], probes: Any, dim: int, dev: str, sizes: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Every probe's output: alone (T=1), in batches of `sizes` tokens (probe i at a
    different position in each), with autograd at the largest size; the decode form's
    call count; the load-balance counter's increments by both paths for one batch; the
    normal mode's outputs for the largest batch (closeness control)."""
    from spmd_moe.kernels import invariant_gemm as ig

    calls = [0]
    orig = ig.routed_decode

    def counting(*a: Any, **k: Any) -> torch.Tensor:
        calls[0] += 1
        return orig(*a, **k)

    ig.routed_decode = counting
    try:
        n = probes.shape[0]
        runs: list[torch.Tensor] = []
        decode_calls: list[int] = []
        g = torch.Generator().manual_seed(seed)
        xs = {}
        for T in sizes:
            x = torch.randn(T, dim, generator=g).to(probes.dtype)
            pos = torch.randperm(T, generator=g)[:n]
            x[pos] = probes
            xs[T] = (x.to(dev), pos)
        with batch_invariant(), torch.no_grad():
            before = calls[0]
            runs.append(torch.cat([moe(probes[i : i + 1].to(dev)) for i in range(n)]))
            decode_calls.append(calls[0] - before)
            for T in sizes:
                x, pos = xs[T]
                before = calls[0]
                runs.append(moe(x)[pos.to(dev)])
                decode_calls.append(calls[0] - before)
        # Autograd: the general path (dispatcher, autograd Functions), at the smallest and
        # the largest size.
        with batch_invariant():
            for T in (sizes[0], sizes[-1]):
                x, pos = xs[T]
                xg = x.clone().requires_grad_(True)
                before = calls[0]
                y = moe(xg)
                y.float().square().sum().backward()  # type: ignore[no-untyped-call]
                runs.append(y.detach()[pos.to(dev)])
                decode_calls.append(calls[0] - before)
        # The load-balance counter: the decode form's atomics vs the general path's count.
        x, _ = xs[sizes[0]]
        tpe = moe.tokens_per_expert_E
        with batch_invariant(), torch.no_grad():
            t0 = tpe.clone()
            moe(x)
            t1 = tpe.clone()
        with batch_invariant():
            moe(x.clone().requires_grad_(True))
            t2 = tpe.clone()
        with torch.no_grad():
            normal = moe(xs[sizes[-1]][0])[xs[sizes[-1]][1].to(dev)]
        return {"runs": runs, "decode_calls": decode_calls, "count_decode": t1 - t0, "count_general": t2 - t1,
                "normal": normal}
    finally:
        ig.routed_decode = orig


def check(res: dict[str, Any], sizes: tuple[int, ...], max_t: int, rtol: float, atol: float,
          scale_rel: float | None = None) -> None:
    runs = res["runs"]
    for j, r in enumerate(runs[1:], 1):
        assert torch.equal(r, runs[0]), f"run {j}: max |diff| {float((r.float() - runs[0].float()).abs().max()):.3e}"
    # Which path ran: the probes alone and every batch up to max_t through the decode
    # form (one call per forward), larger batches and autograd through the general path.
    want = [runs[0].shape[0]] + [1 if T <= max_t else 0 for T in sizes] + [0, 0]
    assert res["decode_calls"] == want, (res["decode_calls"], want)
    assert torch.equal(res["count_decode"], res["count_general"]) and int(res["count_decode"].sum()) > 0
    if scale_rel is None:
        torch.testing.assert_close(runs[-1].float(), res["normal"].float(), rtol=rtol, atol=atol)
    else:  # bf16: the largest deviation against the output's scale (elements near 0 have no relative error)
        dev = float((runs[-1].float() - res["normal"].float()).abs().max())
        assert dev <= scale_rel * float(res["normal"].float().abs().max()), (dev, float(res["normal"].abs().max()))


def _layer(dev: str, dtype: torch.dtype, **kw: Any) -> sm.MoE[Any]:
    base: dict[str, Any] = dict(dim=64, hidden_dim=48, num_experts=16, top_k=4, score_func="softmax", route_norm=True,
                                load_balance_coeff=1e-3, shared_hidden_dim=32, param_dtype=dtype, kernels="torchtitan")
    base.update(kw)
    moe = sm.MoE(sm.MoEConfig(**base), device=dev)
    moe.init_states(seed=3, std=0.3)
    if moe.expert_bias_E is not None:  # a bias that changes some routes
        moe.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, base["num_experts"], device=dev))
    return moe


@pytest.mark.skipif(not _has_triton, reason="triton not installed")
@pytest.mark.timeout(900)
def test_decode_form_same_bits_as_general_path_interpreter() -> None:
    """Interpreter (fp32): probes alone, in batches of 5 and 40 (decode form, T <= 64)
    and 100 (general path), and under autograd: bitwise equal; softmax + bias + renorm,
    and sigmoid + route_scale. Close to the normal mode (fp32: rtol 1e-4, atol 1e-5; the
    same routes, the sums in another order)."""
    code = r'''
import torch
from spmd_moe.kernels import invariant_gemm as ig
from tests.test_batch_invariance_decode import _layer, probe_bits, check
ig.ON_CPU = True
sizes = (5, 40, 100)
p = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
for kw in ({}, {"score_func": "sigmoid", "route_scale": 2.5, "route_norm": False, "load_balance_coeff": None}):
    moe = _layer("cpu", torch.float32, **kw)
    check(probe_bits(moe, p, 64, "cpu", sizes), sizes, ig.DECODE_MAX_T, rtol=1e-4, atol=1e-5)
print("OK")
'''
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=800, cwd=ROOT)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout + r.stderr)[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device tool)")
def test_decode_form_same_bits_as_general_path_cuda() -> None:
    """GPU: bf16 (the decode target: fused route, SwiGLU epilogue with bf16 rounding
    steps, bf16 combine) and fp32 layers; probes alone, in batches of 7 and 64 (decode
    form) and 300 and 1000 (general path), under autograd: bitwise. Close to the normal
    mode: bf16 within 3e-2 of the output's largest magnitude (a few bf16 ulps, 2^-8
    each, after the a1/a3/SwiGLU/down/combine roundings in another order); fp32 rtol
    1e-4, atol 1e-3 (outputs of magnitude ~10-100 at these weights; fp32 sums of 256-long
    dot products in another order)."""
    sizes = (7, 64, 300, 1000)
    from spmd_moe.kernels import invariant_gemm as ig

    for dtype in (torch.bfloat16, torch.float32):
        moe = _layer("cuda", dtype, dim=256, hidden_dim=128, num_experts=32, top_k=8)
        p = torch.randn(3, 256, generator=torch.Generator().manual_seed(7)).to(dtype)
        res = probe_bits(moe, p, 256, "cuda", sizes)
        if dtype == torch.bfloat16:
            check(res, sizes, ig.DECODE_MAX_T, rtol=0, atol=0, scale_rel=3e-2)
        else:
            check(res, sizes, ig.DECODE_MAX_T, rtol=1e-4, atol=1e-3)


def _compiled(fn: Any) -> int | None:
    """How many binaries Triton's JIT holds for a kernel (None: this Triton keeps them
    elsewhere)."""
    try:
        return sum(len(v[0]) for v in fn.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device tool)")
def test_decode_form_one_binary_for_every_t_cuda() -> None:
    """The mechanism that lets vLLM capture one graph per batch size without a compile in
    between: once the decode form has run at one T, running it at other T (1 to 64) and
    through either plan compiles no new variant of the GEMM, up and route kernels (the
    row count and the mode switches are unspecialised runtime arguments)."""
    from spmd_moe.kernels import invariant_triton as kt

    moe = _layer("cuda", torch.bfloat16, dim=256, hidden_dim=128, num_experts=32, top_k=8)
    kernels = (kt.grouped_gemm_kernel, kt.swiglu_up_kernel, kt.route_kernel)
    g = torch.Generator().manual_seed(1)
    with batch_invariant(), torch.no_grad():
        moe(torch.randn(7, 256, generator=g).to(torch.bfloat16).cuda())
        before = [_compiled(k) for k in kernels]
        if None in before:
            pytest.skip("this Triton version keeps its compiled kernels elsewhere")
        for T in (1, 2, 33, 64):
            moe(torch.randn(T, 256, generator=g).to(torch.bfloat16).cuda())
        after = [_compiled(k) for k in kernels]
    assert after == before, f"new binaries compiled by the decode form at another T: {before} -> {after}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device tool)")
def test_expert_tiles_same_bits_cuda() -> None:
    """The decode form runs the expert kernels with 16-row tiles, the general path with
    128-row ones (invariant_gemm._decode_tiles_note). Its claim: a row's bits do not
    depend on the tile config (rows, columns, warps, stages; wgmma at >= 64 rows,
    mma.sync below). Every config below, for the down GEMM and the fused up + SwiGLU
    kernel, bf16 (tensor cores) and fp32 (FMA), grouped rows with an empty group, at the
    Qwen3 layer's D and F: torch.equal to the first. Control: the down GEMM within 2 %
    of max|y| of a float64 GEMM in bf16 (inputs rounded to bf16 first, output rounded
    once: a few bf16 ulps), 1e-5 in fp32."""
    from spmd_moe.kernels import invariant_gemm as ig

    gemm = [(128, 128, 64, 8, 3), (16, 64, 64, 4, 4), (64, 128, 64, 4, 3), (32, 128, 64, 4, 3),
            (16, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 4)]
    up = [(128, 64, 64, 8, 3), (16, 32, 64, 4, 4), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3),
          (128, 32, 64, 8, 3)]
    g = torch.Generator().manual_seed(0)
    R, D, F, E = 300, 2048, 768, 4
    counts = torch.tensor([100, 0, 150, 50], dtype=torch.int32).cuda()
    orig = ig._config
    try:
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(R, D, generator=g).to(dt).cuda()
            h = torch.randn(R, F, generator=g).to(dt).cuda()
            w1, w3 = ((torch.randn(E, F, D, generator=g) * 0.03).to(dt).cuda() for _ in range(2))
            w2 = (torch.randn(E, D, F, generator=g) * 0.03).to(dt).cuda()
            down0 = None
            for name, cfgs in (("down", gemm), ("up", up)):
                if dt == torch.float32:  # fp32 takes BK 32 (shared memory)
                    cfgs = [(m, n, 32, wp, st) for m, n, _, wp, st in cfgs]
                outs = []
                for c in cfgs:
                    ig._config = lambda *a, c=c, **k: c  # type: ignore[assignment]
                    if name == "down":
                        outs.append(ig._launch(h, w2, w2.stride(), D, counts, dt, counts=True))
                    else:
                        outs.append(ig._up(x, w1, w3, counts, counts=True, save=False)[0])
                for c, o in zip(cfgs[1:], outs[1:]):
                    assert torch.equal(o, outs[0]), f"{dt} {name}: tiles {c} change a row's bits vs {cfgs[0]}"
                down0 = outs[0] if name == "down" else down0
            assert down0 is not None and down0.shape == (R, D)
            ends = torch.cumsum(counts.long(), 0).tolist()
            ref = torch.cat([h[s:e].double() @ w2[i].double().t() for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends))])
            err = (down0.double() - ref).abs().max().item()
            tol = 2e-2 if dt == torch.bfloat16 else 1e-5
            assert err <= tol * ref.abs().max().item(), f"{dt}: down GEMM off float64 by {err:.3e}"
    finally:
        ig._config = orig


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device tool)")
def test_router_tiles_same_bits_cuda() -> None:
    """The router's GEMM is the one whose tiles follow the row count
    (invariant_gemm._router_config). Its claim: a logit's bits do not depend on the
    tiles, warps or stages (Triton's fp32 'ieee' dot is one fma chain per element, k
    ascending). Every config below, bf16 and fp32 inputs, the Qwen3 router's shape
    (D = 2048, E = 128), 777 rows (odd, partial tiles): torch.equal to the first. Control:
    within 1e-5 of max|logit| of a float64 GEMM (fp32 sums of 2048 products; the configs
    computing the same wrong thing would fail it)."""
    from spmd_moe.kernels import invariant_gemm as ig

    configs = [(16, 16, 64, 4, 4), (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
               (128, 64, 32, 4, 3), (32, 32, 128, 4, 2)]
    g = torch.Generator().manual_seed(5)
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(777, 2048, generator=g).to(dt).cuda()
        w = (torch.randn(128, 2048, generator=g) * 0.05).to(dt).cuda().unsqueeze(0)
        outs = []
        orig = ig._router_config
        try:
            for c in configs:
                ig._router_config = lambda R, c=c: c  # type: ignore[misc]
                outs.append(ig._launch(x, w, w.stride(), 128, None, torch.float32, f32=True))
        finally:
            ig._router_config = orig
        for c, o in zip(configs[1:], outs[1:]):
            assert torch.equal(o, outs[0]), f"{dt}: tiles {c} change the router's bits vs {configs[0]}"
        ref = (x.double() @ w[0].double().t())
        err = (outs[0].double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-5, f"{dt}: router logits off a float64 GEMM by {err:.2e} of max|logit|"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device tool)")
def test_decode_form_captures_in_cuda_graph() -> None:
    """The decode form makes no host sync: it is captured in a CUDA graph and replays
    give the eager bits on new inputs."""
    moe = _layer("cuda", torch.bfloat16, dim=256, hidden_dim=128, num_experts=32, top_k=8)
    x = torch.randn(4, 256, device="cuda").to(torch.bfloat16)
    with batch_invariant(), torch.no_grad():
        s = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                moe(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = moe(x)
        for seed in (1, 2):
            x.copy_(torch.randn(4, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
            graph.replay()
            assert torch.equal(y, moe(x.clone()))
