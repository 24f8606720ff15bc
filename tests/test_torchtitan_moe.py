"""spmd_moe vs torchtitan 0.3.0's MoE (torchtitan.models.common.moe.MoE), same weights, CPU.

torchtitan runs its experts in bf16 whatever the input dtype (x and weights cast to
bf16 before torch._grouped_mm, the result cast back); the router and the combine run
in fp32. spmd_moe with MoEConfig(expert_dtype=torch.bfloat16) does the same steps:
the same grouped GEMM kernel on the same expert-sorted rows, then per token the terms
fp32(w_k * out_k) summed in ascending expert id starting from 0, which is the order
in which torchtitan's deterministic scatter_add visits the expert-sorted rows (stable
argsort by expert id). So the forward is asserted **bitwise** equal.

The state dict keys are identical, so torchtitan loads spmd_moe's state dict as is.
torchtitan is built from its Config classes directly (no Trainer, no device mesh, no
distributed init): at EP=1 its LocalTokenDispatcher needs none.

Where CUDA is present the forward/backward tests also run there (torch._grouped_mm's
CUDA kernel on both sides); on one H200, torch 2.11, all were bitwise too.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from torch import nn

tt_moe = pytest.importorskip("torchtitan.models.common.moe")
from torchtitan.components.optimizer.optimizer import register_moe_load_balancing_hook  # noqa: E402
from torchtitan.models.common.feed_forward import FeedForward  # noqa: E402
from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402

from spmd_moe.config import MoEConfig  # noqa: E402
from spmd_moe.moe import MoE  # noqa: E402

D, F, E, S = 32, 48, 8, 40
B, L = 2, 48  # torchtitan takes [B, L, D]; spmd_moe the flattened [T = B*L, D]

# torchtitan's router opens torch.autocast(cpu, float32), which CPU autocast does
# not support: it warns and runs without autocast (the gate stays fp32 as ours).
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")

CASES: dict[str, dict[str, Any]] = {
    "softmax": dict(score_func="softmax", top_k=2),
    "softmax-norm": dict(score_func="softmax", top_k=2, route_norm=True),
    "sigmoid-scale": dict(score_func="sigmoid", top_k=3, route_scale=2.5),
    "sigmoid-norm-groups": dict(
        score_func="sigmoid", top_k=2, route_norm=True, num_expert_groups=4, num_limited_groups=2
    ),
    "bias-softmax": dict(score_func="softmax", top_k=2, load_balance_coeff=1e-3),
    "shared-sigmoid-norm": dict(score_func="sigmoid", top_k=2, route_norm=True, shared_hidden_dim=S),
    "all": dict(
        score_func="sigmoid", top_k=2, route_norm=True, route_scale=1.7, num_expert_groups=2,
        num_limited_groups=1, load_balance_coeff=1e-3, shared_hidden_dim=S,
    ),
}


def tt_config(cfg: MoEConfig) -> Any:
    """torchtitan's MoE.Config with the same semantics as cfg (EP=1 dispatcher)."""
    shared = None
    if cfg.shared_hidden_dim is not None:
        H = cfg.shared_hidden_dim
        shared = FeedForward.Config(
            w1=Linear.Config(in_features=D, out_features=H),
            w2=Linear.Config(in_features=H, out_features=D),
            w3=Linear.Config(in_features=D, out_features=H),
        )
    return tt_moe.MoE.Config(
        num_experts=cfg.num_experts,
        load_balance_coeff=cfg.load_balance_coeff,
        router=tt_moe.TokenChoiceTopKRouter.Config(
            num_experts=cfg.num_experts,
            gate=Linear.Config(in_features=D, out_features=cfg.num_experts),
            top_k=cfg.top_k,
            score_func=cfg.score_func,
            route_norm=cfg.route_norm,
            route_scale=cfg.route_scale,
            num_expert_groups=cfg.num_expert_groups,
            num_limited_groups=cfg.num_limited_groups,
        ),
        routed_experts=tt_moe.RoutedExperts.Config(
            inner_experts=tt_moe.GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=cfg.num_experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=cfg.num_experts, top_k=cfg.top_k),
        ),
        shared_experts=shared,
    )


def build_pair(case: str, seed: int = 0, device: str = "cpu") -> tuple[MoEConfig, MoE, nn.Module]:
    # kernels="torchtitan": the kernel choice that promises bitwise equality with torchtitan
    # (the default "fast" may take fused CUDA kernels in bf16 inference).
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, expert_dtype=torch.bfloat16, kernels="torchtitan", **CASES[case])
    ours = MoE(cfg, device=device)
    ours.init_states(seed=seed, std=0.5)
    if ours.expert_bias_E is not None:
        # Nonzero, so the bias changes some selections (checked in test_reference.py).
        ours.expert_bias_E.copy_(torch.randn(E, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    theirs = tt_config(cfg).build().to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # identical keys and shapes
    return cfg, ours, theirs


def inputs(seed: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randn(B * L, D, generator=torch.Generator().manual_seed(seed)).to(device)


# CPU always (CI); CUDA too where present (the GPU machine): the same kernels, bitwise.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    n_diff = int((a != b).sum())
    assert n_diff == 0, f"{what}: {n_diff} of {a.numel()} elements differ, max |diff| {float((a - b).abs().max()):.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_bitwise_equal_to_torchtitan(case: str, device: str) -> None:
    cfg, ours, theirs = build_pair(case, device=device)
    x_TD = inputs(device=device)
    with torch.no_grad():
        y_ours_TD = ours(x_TD)
        y_tt_TD = theirs(x_TD.view(B, L, D)).view(B * L, D)
    assert y_ours_TD.dtype == torch.float32
    assert float(y_tt_TD.abs().max()) > 1.0
    # The experts really ran in bf16: an fp32-expert spmd_moe differs from torchtitan.
    fp32 = MoE(MoEConfig(**{**cfg.__dict__, "expert_dtype": None}), device=device)
    fp32.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert not torch.equal(fp32(x_TD), y_tt_TD)
    assert_bitwise(y_ours_TD, y_tt_TD, f"{case}: forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 3])
def test_forward_bitwise_with_idle_experts(tokens: int, device: str) -> None:
    """Few tokens: most experts get no rows (empty groups in the grouped GEMM)."""
    _, ours, theirs = build_pair("all", seed=3, device=device)
    x_TD = inputs(seed=4, device=device)[:tokens]
    with torch.no_grad():
        y_ours_TD = ours(x_TD)
        y_tt_TD = theirs(x_TD.view(1, tokens, D)).view(tokens, D)
    assert int((ours.tokens_per_expert_E == 0).sum()) >= E - 2 * tokens
    assert_bitwise(y_ours_TD, y_tt_TD, f"{tokens} tokens: forward")


class _Block(nn.Module):
    """What torchtitan's load-balancing hook looks for: layers[i].moe_enabled / .moe."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe_enabled = True
        self.moe = moe


class _NoParallel:
    ep_enabled = False
    tp = 1

    def get_optional_mesh(self, name: str) -> None:
        return None


class _HookSink:
    def __init__(self) -> None:
        self.hooks: list[Any] = []

    def register_step_pre_hook(self, hook: Any) -> None:
        self.hooks.append(hook)


def test_train_steps_with_expert_bias_update_match_torchtitan() -> None:
    """Counters, torchtitan's own bias-update hook vs MoE.update_expert_bias, and the
    forward after the bias moved (new selections), all bitwise over 3 steps."""
    cfg, ours, theirs = build_pair("all", seed=5)
    ours.train()
    theirs.train()
    model = nn.Module()
    model.layers = nn.ModuleDict({"0": _Block(theirs)})
    sink = _HookSink()
    register_moe_load_balancing_hook(sink, [model], _NoParallel())  # type: ignore[arg-type]
    assert len(sink.hooks) == 1
    assert ours.expert_bias_E is not None
    bias0 = ours.expert_bias_E.clone()
    for step in range(3):
        x_TD = inputs(seed=10 + step)
        with torch.no_grad():
            y_ours = ours(x_TD)
            y_tt = theirs(x_TD.view(B, L, D)).view(B * L, D)
        assert_bitwise(y_ours, y_tt, f"step {step}: forward")
        assert_bitwise(ours.tokens_per_expert_E, theirs.tokens_per_expert_E, f"step {step}: tokens_per_expert_E")
        ours.update_expert_bias()
        sink.hooks[0]()
        assert_bitwise(ours.expert_bias_E, theirs.expert_bias_E, f"step {step}: expert_bias_E")
    assert not torch.equal(ours.expert_bias_E, bias0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["softmax-norm", "shared-sigmoid-norm", "all"])
def test_backward_bitwise_equal_to_torchtitan(case: str, device: str) -> None:
    """Gradients through the bf16 experts, bitwise: spmd_moe's grouped-mm backward is
    its own autograd.Function, but it runs the same bf16 GEMMs, and the input is cast
    to bf16 once per use (w1, w3) as in torchtitan, so the two input grads add in fp32
    in the same order. (Casting once and reusing the bf16 copy made dL/dx differ by
    ~2e-3 relative: the two grads then added in bf16.)"""
    _, ours, theirs = build_pair(case, device=device)
    x_TD = inputs(device=device)
    g_TD = torch.randn(B * L, D, generator=torch.Generator().manual_seed(9)).to(device)
    x_ours = x_TD.clone().requires_grad_(True)
    x_tt = x_TD.clone().view(B, L, D).requires_grad_(True)
    (ours(x_ours) * g_TD).sum().backward()
    (theirs(x_tt).view(B * L, D) * g_TD).sum().backward()
    assert x_ours.grad is not None and x_tt.grad is not None
    assert_bitwise(x_ours.grad, x_tt.grad.view(B * L, D), f"{case}: grad of x")
    tt_params = dict(theirs.named_parameters())
    assert set(tt_params) == {k for k, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        a, b = p.grad, tt_params[name].grad
        assert a is not None and b is not None, name
        assert float(b.abs().max()) > 0, f"{name}: zero gradient, comparison would be vacuous"
        assert_bitwise(a, b, f"{case}: grad of {name}")
