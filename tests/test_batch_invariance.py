"""Batch-invariant mode: a token's MoE output is bitwise the same whatever else is in
the batch, at EP degree 1, 2 and 4, with and without autograd, on CPU (gloo).

Probe tokens are run (a) alone, (b) one at a time (T=1, the decode shape), (c) inside
bigger batches of other tokens at shuffled positions, with both dispatchers
(all_to_all and all_gather) and both layouts ('replicated': every rank has the batch;
'sequence': every rank has its own tokens). Every probe output must be torch.equal
to the first one computed (no tolerance: the claim is bitwise). A control shows the
claim is not vacuous: without the mode, the same probes do differ between batches on
this CPU (fp32 GEMM results depend on the row count M).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
from typing import Any

import pytest
import torch

import spmd_moe as sm
from spmd_moe.batch_invariant import batch_invariant, is_batch_invariant
from tests.dist_utils import run_distributed

D, F, E, S = 32, 48, 8, 64
N_PROBE = 3


def cfg(dispatcher: str = "auto", **kw: Any) -> sm.MoEConfig:
    base: dict[str, Any] = dict(
        dim=D, hidden_dim=F, num_experts=E, top_k=2, score_func="softmax", route_norm=True,
        load_balance_coeff=1e-3, shared_hidden_dim=S, dispatcher=dispatcher, padding="pad",
    )
    base.update(kw)
    return sm.MoEConfig(**base)


def probes() -> torch.Tensor:
    return torch.randn(N_PROBE, D, generator=torch.Generator().manual_seed(7))


def batches(seed: int) -> list[tuple[torch.Tensor, list[int]]]:
    """(x_TD, positions of the probes in x_TD) for several batch compositions."""
    g = torch.Generator().manual_seed(seed)
    p = probes()
    out: list[tuple[torch.Tensor, list[int]]] = [(p.clone(), list(range(N_PROBE)))]
    for T in (6, 29):
        x = torch.randn(T, D, generator=g)
        pos = random.Random(seed * 100 + T).sample(range(T), N_PROBE)
        for i, t in enumerate(pos):
            x[t] = p[i]
        out.append((x, pos))
    return out


def make_moe(c: sm.MoEConfig, pctx: sm.ParallelContext, layout: str, dev: str = "cpu") -> sm.MoE:
    moe = sm.MoE(c, pctx, layout=layout, device=dev)  # type: ignore[arg-type]
    moe.init_states(seed=3, std=0.3)  # same weights at every EP degree
    assert moe.expert_bias_E is not None
    moe.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, E, device=moe.expert_bias_E.device))
    return moe


def run_probe_outputs(moe: sm.MoE, layout: str, rank: int, n: int, grad: bool, dev: str = "cpu") -> list[list[torch.Tensor]]:
    """For every batch, the probe outputs (only rank 0 holds probes in 'sequence')."""
    results: list[list[torch.Tensor]] = []
    for b, (x, pos) in enumerate(batches(11)):
        if layout == "sequence" and rank != 0:
            # Other ranks: their own, different tokens (same count, as shared experts need).
            x = torch.randn(x.shape[0], D, generator=torch.Generator().manual_seed(1000 * rank + b))
        x = x.to(dev).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = moe(x)
            if grad:
                y.square().sum().backward()  # backward runs in the mode too
        results.append([y[t].detach().clone() for t in pos])
    # Decode shape: one probe at a time (T=1; replicated layout pads it to n rows).
    if layout == "replicated":
        single = []
        for i in range(N_PROBE):
            x1 = probes()[i : i + 1].to(dev).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                single.append(moe(x1)[0].detach().clone())
        results.append(single)
    return results


def first_mismatch(all_runs: list[list[torch.Tensor]]) -> str | None:
    ref = all_runs[0]
    for j, run in enumerate(all_runs[1:], 1):
        for i, (a, b) in enumerate(zip(ref, run)):
            if not torch.equal(a, b):
                return f"batch {j} probe {i}: max |diff| {float((a - b).abs().max()):.3e}"
    return None


def _worker(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    torch.manual_seed(0)
    groups = {4: None, 2: dist.new_group([0, 1]), 1: None}
    g23 = dist.new_group([2, 3])
    out: dict[str, Any] = {}
    for n in (1, 2, 4):
        if n == 1:
            if rank != 0:
                continue
            pctx = sm.ParallelContext.single()
        elif n == 2:
            if rank >= 2:
                # Ranks 2, 3 form their own EP=2 group running the same thing (not checked).
                pctx = sm.ParallelContext.from_group(g23)
            else:
                pctx = sm.ParallelContext.from_group(groups[2])
        else:
            pctx = sm.ParallelContext.from_group(dist.group.WORLD)
        for layout in ("replicated", "sequence"):
            runs: list[list[torch.Tensor]] = []
            with batch_invariant():
                assert is_batch_invariant()
                for dispatcher, grad in (("all_to_all", False), ("all_gather", False), ("all_to_all", True)):
                    moe = make_moe(cfg(dispatcher), pctx, layout)
                    runs.extend(run_probe_outputs(moe, layout, pctx.rank, n, grad))
            if pctx.rank == 0:
                out[f"ep{n}-{layout}"] = (len(runs), first_mismatch(runs), runs[0][0])
    return out


@pytest.mark.timeout(1200)
def test_batch_invariant_ep1_ep2_ep4_bitwise() -> None:
    res = run_distributed(_worker, 4, timeout=900, pg_timeout=600)
    r0 = res[0]
    for n in (1, 2, 4):
        for layout in ("replicated", "sequence"):
            n_runs, mismatch, _ = r0[f"ep{n}-{layout}"]
            assert n_runs >= 9, (n, layout, n_runs)
            assert mismatch is None, f"EP={n} layout={layout}: not batch-invariant: {mismatch}"
    # Different EP degrees need not agree bitwise (the shared experts' partial sums are
    # added over a different split), but they are the same function: close.
    y1 = r0["ep1-replicated"][2]
    for n in (2, 4):
        torch.testing.assert_close(r0[f"ep{n}-replicated"][2], y1, rtol=1e-5, atol=1e-6)


def test_control_without_mode_outputs_depend_on_batch() -> None:
    """Without the mode, the same probe differs between batches on this CPU: the
    invariance above is the mode's doing, not an accident of the shapes."""
    moe = make_moe(cfg(), sm.ParallelContext.single(), "replicated")
    with torch.no_grad():
        runs = [[moe(x)[t] for t in pos] for x, pos in batches(11)]
        big = torch.randn(256, D, generator=torch.Generator().manual_seed(5))
        big[100:103] = probes()
        runs.append(list(moe(big)[100:103]))
    assert first_mismatch(runs) is not None, "expected batch-dependent outputs without the mode on this CPU"


def test_mode_switch_and_env() -> None:
    assert not is_batch_invariant()
    with sm.batch_invariant_mode():
        assert sm.is_batch_invariant()
        with sm.batch_invariant_mode(False):
            assert not sm.is_batch_invariant()
        assert sm.is_batch_invariant()
    assert not sm.is_batch_invariant()
    import subprocess
    import sys

    code = "import spmd_moe; print(spmd_moe.is_batch_invariant())"
    env = {**os.environ, "SPMD_MOE_BATCH_INVARIANT": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", r.stderr[-2000:]


def test_invariant_mode_matches_normal_mode_closely() -> None:
    """The mode changes the summation order only: values stay within fp32 rounding of
    the normal path (fp32 experts; the routes are the same). Tolerance: atol 1e-5 on
    outputs of size ~1 (a few ulps of the D- and F-long dot products after
    cancellation), rtol 1e-4."""
    moe = make_moe(cfg(), sm.ParallelContext.single(), "replicated")
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = moe(x)
        with batch_invariant():
            y_bi = moe(x)
    torch.testing.assert_close(y_bi, y, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- CUDA (device tool)
def _cuda_cases(pctx: sm.ParallelContext, dev: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for expert_dtype in (None, torch.bfloat16):
        for layout in ("replicated", "sequence"):
            runs: list[list[torch.Tensor]] = []
            with batch_invariant():
                for dispatcher, grad in (("all_to_all", False), ("all_gather", False), ("all_to_all", True)):
                    moe = make_moe(cfg(dispatcher, expert_dtype=expert_dtype), pctx, layout, dev)
                    runs.extend(run_probe_outputs(moe, layout, pctx.rank, pctx.size, grad, dev))
            out[f"ep{pctx.size}-{layout}-{expert_dtype}"] = (len(runs), first_mismatch(runs))
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device tool)")
def test_batch_invariant_cuda_one_gpu() -> None:
    res = _cuda_cases(sm.ParallelContext.single(), "cuda")
    for key, (n_runs, mismatch) in res.items():
        assert n_runs >= 9 and mismatch is None, f"{key}: {mismatch}"


def cuda_ep2_main() -> None:
    """torchrun --nproc-per-node 2 tests/test_batch_invariance.py: EP=2 over NCCL."""
    import json

    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    res = _cuda_cases(sm.ParallelContext.from_group(dist.group.WORLD), f"cuda:{rank}")
    if rank == 0:
        print("CUDA_EP2", json.dumps({k: [n, m] for k, (n, m) in res.items()}, default=str), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    cuda_ep2_main()
