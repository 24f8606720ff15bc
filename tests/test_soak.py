"""Soak: STEPS forward+backward(+SGD) steps with random token counts on a 2-rank gloo
group, alternating the replicated layout (both ranks draw the same T; prefill
all_to_all or decode all_gather by size) and the sequence layout (each rank draws
its own T), with T = 0 and T < 2 forced regularly. Every step checks the output is
finite and shaped right.

Bounds (asserted on each rank): the run ends within the run_distributed timeout (no
hang: a stuck collective raises after the 30 s group timeout); resident memory after
the last step exceeds the one after WARMUP steps by < RSS_BOUND_MB = 20 MiB, and by
< TREND_BOUND_MB = 4 MiB over the second half (no steady upward trend). Measured on a
loaded 2-core box: +1.6 / +2.0 MiB after warm-up (ranks 0 / 1), +0.2 / +0.3 MiB over the
second half; 1000 steps in ~18 s (load ~2) to ~60 s (load ~20).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest

from dist_utils import run_distributed

STEPS = 1000
WARMUP = 100
RSS_BOUND_MB = 20.0
TREND_BOUND_MB = 4.0  # growth over the second half of the run
SAMPLE_EVERY = 50


def _soak(rank: int, world: int, steps: int) -> dict[str, Any]:
    import psutil
    import torch
    import torch.distributed as dist

    import spmd_moe as sm

    pctx = sm.ParallelContext.from_group(dist.group.WORLD)
    cfg = sm.MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, shared_hidden_dim=8,
                       load_balance_coeff=1e-3, decode_max_tokens=4, padding="pad")
    layers = {"replicated": sm.MoE(cfg, pctx, layout="replicated", name="rep"),
              "sequence": sm.MoE(cfg, pctx, layout="sequence", name="seq")}
    for m in layers.values():
        m.init_states(0)
    params = [p for m in layers.values() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    shared = torch.Generator().manual_seed(1234)  # same draws on every rank
    mine = torch.Generator().manual_seed(99 + rank)  # this rank's draws
    proc = psutil.Process()
    samples: list[tuple[int, float]] = []
    counts = {"T0": 0, "T_lt_n": 0, "decode": 0, "prefill": 0, "sequence": 0}
    t0 = time.monotonic()
    for step in range(steps):
        layout = "replicated" if step % 2 == 0 else "sequence"
        gen = shared if layout == "replicated" else mine
        # Every 7th step T=0, every 11th T=1, else uniform in [0, 40].
        T = 0 if step % 7 == 3 else 1 if step % 11 == 5 else int(torch.randint(0, 41, (1,), generator=gen))
        counts["T0"] += T == 0
        counts["T_lt_n"] += T < world
        if layout == "replicated":
            counts["decode" if -(-T // world) <= cfg.decode_max_tokens else "prefill"] += 1
        else:
            counts["sequence"] += 1
        x = torch.randn(T, cfg.dim, generator=gen, requires_grad=True)
        y = layers[layout](x)
        assert y.shape == (T, cfg.dim) and bool(torch.isfinite(y).all()), (step, T, layout)
        (y.square().mean() if T else y.sum()).backward()
        assert x.grad is not None and x.grad.shape == (T, cfg.dim)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 49:
            for m in layers.values():
                m.update_expert_bias()  # all_reduce of the counters on both ranks
        if step + 1 in (WARMUP, steps // 2, steps):
            gc.collect()  # slow on a big heap: only at the three compared points
            samples.append((step + 1, proc.memory_info().rss / 2**20))
        elif (step + 1) % SAMPLE_EVERY == 0:
            samples.append((step + 1, proc.memory_info().rss / 2**20))
    return {"samples": samples, "seconds": time.monotonic() - t0, "counts": counts}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_1000_steps_rss_flat() -> None:
    res = run_distributed(_soak, 2, STEPS, timeout=240, pg_timeout=30)
    for rank, r in enumerate(res):
        c = r["counts"]
        assert c["T0"] >= 100 and c["T_lt_n"] >= 150 and c["decode"] > 0 and c["prefill"] > 0, c
        rss = dict(r["samples"])
        after_warmup, end = rss[WARMUP], rss[STEPS]
        mid = rss[STEPS // 2]
        summary = (f"rank {rank}: RSS after warm-up {after_warmup:.1f} MiB, at step {STEPS // 2} "
                   f"{mid:.1f}, at end {end:.1f}; {r['seconds']:.1f} s for {STEPS} steps; {c}")
        print(summary)
        assert end - after_warmup < RSS_BOUND_MB, summary
        assert end - mid < TREND_BOUND_MB, summary
    gc.collect()
