"""MoE forward and backward (fp32, CPU, one device) against the float64 per-token loop
in tests/reference.py (written from the definitions, not from spmd_moe's code).

Relative error here is max|a - b| / max|b| over the whole tensor, b the float64
reference. Bound 1e-5: fp32 has a unit roundoff of 6e-8 and these shapes sum at most
a few dozen terms per output, so correct fp32 code lands near 1e-7; a wrong route,
weight or gradient term gives errors of order 1e-2 or more.

Weights use std 0.5 (init_states(std=0.5)) so outputs and gradients are O(1), not so
small that a relative error means nothing. Inputs are random normal: a near-tie
between the k-th and (k+1)-th expert (a score gap under ~1e-7, where fp32 and float64
could choose differently) is unlikely at these sizes, and each test first asserts
that spmd_moe and the reference chose the same experts for every token, so a tie
would fail there with a clear message rather than as a numeric mismatch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from spmd_moe.config import MoEConfig
from spmd_moe.moe import MoE
from tests.reference import reference_moe

D, F, E, T = 16, 24, 8, 48
REL_TOL = 1e-5  # see the module docstring

# Each case flips a few options; together both values of every option appear:
# score_func, route_norm, group-limited routing, shared experts, expert bias.
CASES: dict[str, dict[str, object]] = {
    "softmax": dict(score_func="softmax", top_k=2),
    "softmax-norm": dict(score_func="softmax", top_k=2, route_norm=True),
    "sigmoid": dict(score_func="sigmoid", top_k=2, route_scale=2.5),
    "sigmoid-norm": dict(score_func="sigmoid", top_k=3, route_norm=True),
    "groups-softmax": dict(score_func="softmax", top_k=3, num_expert_groups=4, num_limited_groups=2),
    "groups-sigmoid-norm": dict(
        score_func="sigmoid", top_k=2, route_norm=True, num_expert_groups=4, num_limited_groups=2
    ),
    "shared-softmax-norm": dict(score_func="softmax", top_k=2, route_norm=True, shared_hidden_dim=20),
    "bias-softmax": dict(score_func="softmax", top_k=2, load_balance_coeff=1e-3),
    "bias-sigmoid-groups-shared": dict(
        score_func="sigmoid", top_k=2, route_norm=True, num_expert_groups=2, num_limited_groups=1,
        shared_hidden_dim=20, load_balance_coeff=1e-3,
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b the float64 reference)."""
    return float((a.double() - b).abs().max() / b.abs().max())


def build(case: str, seed: int = 0) -> tuple[MoEConfig, MoE, torch.Tensor]:
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, **CASES[case])  # type: ignore[arg-type]
    moe = MoE(cfg)
    moe.init_states(seed=seed, std=0.5)
    if moe.expert_bias_E is not None:
        # A bias comparable to the score gaps, so it changes some selections.
        g = torch.Generator().manual_seed(seed + 1)
        scale = 0.3 if cfg.score_func == "sigmoid" else 0.1
        moe.expert_bias_E.copy_(torch.randn(E, generator=g) * scale)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 2))
    return cfg, moe, x_TD


def run_ours(moe: MoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    moe.record_routes = True
    moe.recorded_routes.clear()
    y_TD = moe(x_TD)
    routes = moe.recorded_routes[-1].tolist()
    moe.record_routes = False
    return y_TD, routes


def assert_same_routes(ours: list[list[int]], ref: list[list[int]]) -> None:
    bad = [t for t in range(len(ref)) if sorted(ours[t]) != ref[t]]  # recorded in the router's k order
    assert not bad, (
        f"tokens {bad[:5]} routed differently: spmd_moe {[ours[t] for t in bad[:5]]}, "
        f"reference {[ref[t] for t in bad[:5]]} (a near-tie? change the seed)"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_loop(case: str) -> None:
    cfg, moe, x_TD = build(case)
    with torch.no_grad():
        y_TD, routes = run_ours(moe, x_TD)
        ref_routes: list[list[int]] = []
        y_ref_TD = reference_moe(cfg, moe.state_dict(), x_TD, ref_routes)
    assert_same_routes(routes, ref_routes)
    assert y_TD.dtype == torch.float32  # fp32 in, fp32 compute, fp32 out
    assert float(y_ref_TD.abs().max()) > 1.0  # outputs are not tiny (see docstring)
    err = rel_err(y_TD, y_ref_TD)
    assert err < REL_TOL, f"{case}: forward relative error {err:.2e}"


def backward_errors(case: str) -> dict[str, float]:
    """Relative error of each gradient (input, every parameter) vs float64 autograd."""
    cfg, moe, x_TD = build(case)
    g_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(7))  # dL/dy

    x_TD = x_TD.clone().requires_grad_(True)
    y_TD, routes = run_ours(moe, x_TD)
    (y_TD * g_TD).sum().backward()

    sd64 = {k: v.detach().double().requires_grad_(k != "expert_bias_E") for k, v in moe.state_dict().items()}
    x64_TD = x_TD.detach().double().requires_grad_(True)
    ref_routes: list[list[int]] = []
    y64_TD = reference_moe(cfg, sd64, x64_TD, ref_routes)
    (y64_TD * g_TD.double()).sum().backward()
    assert_same_routes(routes, ref_routes)

    params = dict(moe.named_parameters())
    pairs = {"x_TD": (x_TD.grad, x64_TD.grad)}
    pairs.update({k: (params[k].grad, sd64[k].grad) for k in params})
    assert "router.gate.weight" in pairs and "routed_experts.inner_experts.w2_EDF" in pairs
    errs = {}
    for name, (ours, ref) in pairs.items():
        assert ours is not None and ref is not None, f"{case}: no gradient for {name}"
        assert float(ref.abs().max()) > 1e-2, f"{case}: reference gradient of {name} is ~0"
        errs[name] = rel_err(ours, ref)
    return errs


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_float64_autograd(case: str) -> None:
    errs = backward_errors(case)
    worst = max(errs, key=errs.__getitem__)
    assert errs[worst] < REL_TOL, f"{case}: gradient of {worst}: relative error {errs[worst]:.2e} ({errs})"


@pytest.mark.parametrize("case", ["bias-softmax", "bias-sigmoid-groups-shared"])
def test_expert_bias_changes_selection_not_weights(case: str) -> None:
    """The bias cases above are meaningful only if the bias changed some choices."""
    cfg, moe, x_TD = build(case)
    assert moe.expert_bias_E is not None
    with torch.no_grad():
        w_TK, ids_TK, scores_TE = moe.router(x_TD, moe.expert_bias_E)
        _, ids0_TK, _ = moe.router(x_TD, None)
    changed = (ids_TK.sort(-1).values != ids0_TK.sort(-1).values).any(-1)
    assert 0 < int(changed.sum()) < T, f"bias changed {int(changed.sum())} of {T} tokens"
    # Gate values come from the unbiased scores of the chosen experts.
    expect_TK = scores_TE.gather(-1, ids_TK)
    if cfg.route_norm:
        expect_TK = expect_TK / expect_TK.sum(-1, keepdim=True)
    torch.testing.assert_close(w_TK, expect_TK * cfg.route_scale, rtol=1e-6, atol=0)


if __name__ == "__main__":  # the measured errors: python -m tests.test_reference
    for case in CASES:
        cfg, moe, x_TD = build(case)
        with torch.no_grad():
            fwd = rel_err(moe(x_TD), reference_moe(cfg, moe.state_dict(), x_TD))
        print(f"{case:28s} forward {fwd:.2e}  worst gradient {max(backward_errors(case).values()):.2e}")
