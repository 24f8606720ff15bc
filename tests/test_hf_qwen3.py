"""spmd_moe vs HF transformers' Qwen3MoeSparseMoeBlock with the same weights (fp32, CPU).

Weight map (transformers 5.x stores the experts fused):
    gate.weight                      = router.gate.weight
    experts.gate_up_proj[e] = [w1; w3]  (gate_proj rows first, then up_proj)
    experts.down_proj[e]             = w2
Qwen3-MoE routing is softmax top-k with norm_topk_prob = our route_norm, no scale,
no groups, no bias, no shared experts.

Relative error is max|a - b| / max|b|, bound 1e-5: both sides compute in fp32 with
different GEMM kernels (HF: one F.linear per expert; spmd_moe: torch._grouped_mm),
so they differ by a few fp32 roundings (~1e-7 relative); a wrong weight mapping or
routing rule gives errors of order 1e-1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

qwen3_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
from transformers import Qwen3MoeConfig  # noqa: E402

from spmd_moe.config import MoEConfig  # noqa: E402
from spmd_moe.moe import MoE  # noqa: E402

D, F, E, K, T = 32, 48, 8, 2, 40
REL_TOL = 1e-5  # see the module docstring


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_block(norm_topk_prob: bool, experts_impl: str) -> torch.nn.Module:
    hf_cfg = Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
        norm_topk_prob=norm_topk_prob, hidden_act="silu",
    )
    hf_cfg._experts_implementation = experts_impl
    return qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)


def load_into_hf(block: torch.nn.Module, moe: MoE) -> None:
    sd = moe.state_dict()
    w1 = sd["routed_experts.inner_experts.w1_EFD"]
    w3 = sd["routed_experts.inner_experts.w3_EFD"]
    missing, unexpected = block.load_state_dict(
        {
            "gate.weight": sd["router.gate.weight"],
            "experts.gate_up_proj": torch.cat([w1, w3], dim=1),  # [E, 2F, D]
            "experts.down_proj": sd["routed_experts.inner_experts.w2_EDF"],
        },
        strict=True,
    )
    assert not missing and not unexpected


# 'eager' is HF's per-expert loop; 'grouped_mm' its torch._grouped_mm path.
@pytest.mark.parametrize("experts_impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_hf_qwen3_moe_block(norm_topk_prob: bool, experts_impl: str) -> None:
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func="softmax", route_norm=norm_topk_prob)
    moe = MoE(cfg)
    moe.init_states(seed=3, std=0.5)  # O(1) outputs so the relative error means something
    block = hf_block(norm_topk_prob, experts_impl)
    load_into_hf(block, moe)

    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    x_ours = x_TD.clone().requires_grad_(True)
    x_hf = x_TD.clone().requires_grad_(True)
    y_ours = moe(x_ours)
    y_hf = block(x_hf.view(1, T, D)).view(T, D)
    assert y_hf.dtype == y_ours.dtype == torch.float32
    assert float(y_hf.detach().abs().max()) > 1.0
    err = rel_err(y_ours.detach(), y_hf.detach())
    assert err < REL_TOL, f"forward relative error vs HF {err:.2e}"

    # Gradients of the input and of the expert weights, through the same loss.
    g_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    (y_ours * g_TD).sum().backward()
    (y_hf * g_TD).sum().backward()
    assert x_ours.grad is not None and x_hf.grad is not None
    ex = moe.experts
    hf_gu = block.experts.gate_up_proj.grad
    grads = {
        "x": (x_ours.grad, x_hf.grad),
        "gate": (moe.router.gate.weight.grad, block.gate.weight.grad),
        "w1": (ex.w1_EFD.grad, hf_gu[:, :F]),
        "w3": (ex.w3_EFD.grad, hf_gu[:, F:]),
        "w2": (ex.w2_EDF.grad, block.experts.down_proj.grad),
    }
    for name, (a, b) in grads.items():
        assert a is not None and b is not None, name
        e = rel_err(a, b)
        assert e < REL_TOL, f"gradient of {name}: relative error vs HF {e:.2e}"


if __name__ == "__main__":  # the measured errors: python -m tests.test_hf_qwen3
    for norm in (True, False):
        for impl in ("eager", "grouped_mm"):
            moe = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, route_norm=norm))
            moe.init_states(seed=3, std=0.5)
            block = hf_block(norm, impl)
            load_into_hf(block, moe)
            x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
            with torch.no_grad():
                err = rel_err(moe(x_TD), block(x_TD.view(1, T, D)).view(T, D))
            print(f"norm_topk_prob={norm!s:5s} experts={impl:10s} forward relative error {err:.2e}")
