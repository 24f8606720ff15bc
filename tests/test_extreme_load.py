"""Extreme load: every token to one expert, and memory that grows with T, not T x E.

All tokens go to one expert through the normal routing path: the aux-loss-free expert
bias (MoEConfig.load_balance_coeff) of that expert is set far above the score range
[0, 1], so top-1 picks it for every token while the gate weight stays the softmax score.

Memory: a subprocess (fresh allocator, MALLOC_MMAP_THRESHOLD_ fixed so freed tensors go
back to the OS) measures the peak-RSS growth of one no-grad forward at several (T, E),
resetting the kernel's high-water mark (VmHWM, /proc/self/clear_refs) before each.

THE BOUND (asserted): peak growth of a forward <= T * (ROUTER_TE_BUFFERS * 4 B * E
+ PER_TOKEN_B) + SLACK_B, i.e. only the router's [T, E] fp32 buffers (logits, scores,
biased choice: 3, we allow 4) scale with E; everything else (rows, hidden, slots) is
O(T * (D + F) * K). A dense [T, E, D] dispatch would need >= 16x more per (T, E) here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import spmd_moe as sm

D, F = 16, 16
ROUTER_TE_BUFFERS = 4  # [T, E] fp32 tensors alive at once in the router (3 measured)
PER_TOKEN_B = 2048  # x row, routed row, 3 hidden rows, expert out, slot, output (~600 B measured)
SLACK_B = 16 * 2**20  # allocator rounding, small per-call tensors
GRID = [(8192, 4), (8192, 128), (32768, 4), (32768, 128)]


def _one_expert_layer(E: int, hot: int) -> sm.MoE:
    cfg = sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=1, load_balance_coeff=1e-3)
    m = sm.MoE(cfg)
    m.init_states(0)
    assert m.expert_bias_E is not None
    with torch.no_grad():
        m.expert_bias_E[hot] = 10.0  # scores are in [0, 1]: top-1 is `hot` for every token
    return m


@pytest.mark.slow
def test_all_tokens_to_one_expert_T65536() -> None:
    T, E, hot = 65536, 8, 5
    torch.manual_seed(0)
    m = _one_expert_layer(E, hot)
    x = torch.randn(T, D)
    t0 = time.monotonic()
    with torch.no_grad():
        y = m(x)
    fwd_s = time.monotonic() - t0
    assert y.shape == (T, D) and torch.isfinite(y).all()
    counts = m.tokens_per_expert_E
    assert counts[hot] == T and counts.sum() == T, counts
    # The result is expert `hot` applied densely, weighted by its softmax score.
    with torch.no_grad():
        e = m.experts
        w = torch.softmax(x @ m.router.gate.weight.t(), dim=-1)[:, hot : hot + 1]
        h = torch.nn.functional.silu(x @ e.w1_EFD[hot].t()) * (x @ e.w3_EFD[hot].t())
        y_ref = w * (h @ e.w2_EDF[hot].t())
    torch.testing.assert_close(y, y_ref, atol=1e-7, rtol=1e-5)  # fp32, different GEMM blocking
    # Training step at the same T: only the hot expert gets gradient.
    xg = x.requires_grad_(True)
    m(xg).pow(2).mean().backward()
    for p in (m.experts.w1_EFD, m.experts.w2_EDF, m.experts.w3_EFD):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        cold = torch.cat([p.grad[:hot], p.grad[hot + 1 :]])
        assert not cold.any() and p.grad[hot].abs().sum() > 0
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert fwd_s < 60, fwd_s


# ------------------------------------------------------------------ memory (subprocess)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _measure(grid: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Peak RSS growth (bytes) of one no-grad forward per (T, E); run in a fresh process."""
    import gc

    torch.set_num_threads(1)
    out = []
    for T, E in grid:
        m = _one_expert_layer(E, hot=0)
        x = torch.randn(T, D)
        with torch.no_grad():
            m(x[:64])  # warm-up: lazy inits, first-call caches
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
        with torch.no_grad():
            y = m(x)
        peak = _status("VmHWM")
        assert torch.isfinite(y).all() and int(m.tokens_per_expert_E[0]) == T + 64
        out.append({"T": T, "E": E, "delta": float(peak - base)})
        del m, x, y
        gc.collect()
    return out


def _clear_refs_ok() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status("VmHWM")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_ok(),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_memory_scales_with_T_not_T_times_E() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, __file__, "measure"], env=env, capture_output=True, text=True, timeout=240,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    delta = {(int(r["T"]), int(r["E"])): r["delta"] for r in rows}
    report = ", ".join(f"T={T} E={E}: {d / 2**20:.1f} MiB" for (T, E), d in sorted(delta.items()))
    for (T, E), d in delta.items():
        bound = T * (ROUTER_TE_BUFFERS * 4 * E + PER_TOKEN_B) + SLACK_B
        assert d <= bound, f"T={T} E={E}: peak growth {d / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB ({report})"
    (t_lo, e_lo), (t_hi, e_hi) = (8192, 4), (32768, 128)
    # What E adds per token and expert: router buffers only (a [T,E,D] dispatch adds >= 64 B).
    for T in (t_lo, t_hi):
        per_te = (delta[(T, e_hi)] - delta[(T, e_lo)]) / (T * (e_hi - e_lo))
        assert per_te <= ROUTER_TE_BUFFERS * 4, f"T={T}: {per_te:.1f} B per token x expert ({report})"
    # Linear in T: 4x the tokens, at most ~4x the growth (+ slack), at both E.
    for E in (e_lo, e_hi):
        assert delta[(t_hi, E)] <= 4 * delta[(t_lo, E)] * 1.25 + SLACK_B, report


if __name__ == "__main__" and sys.argv[1:] == ["measure"]:
    print(json.dumps(_measure(GRID)))
