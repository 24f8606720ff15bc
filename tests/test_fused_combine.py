"""The CUDA fused combine (inference) is bitwise equal to the unfused torch path."""

from __future__ import annotations

import pytest
import torch

import spmd_moe as sm
from spmd_moe import _fused_combine as fc
from spmd_moe.dispatch.local import scatter_to_slots
from spmd_moe.kernels import fast_route as fr
from spmd_moe.moe import _weighted_sum

cuda = pytest.mark.skipif(not torch.cuda.is_available() or fc._build() is None, reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize("T,K,D,npad", [(1, 8, 2048, 0), (37, 8, 2048, 5), (64, 2, 96, 0), (300, 4, 1000, 17)])
def test_fused_equals_unfused(T: int, K: int, D: int, npad: int) -> None:
    g = torch.Generator().manual_seed(T * 1000 + K)
    N, R = T * K, (T - npad) * K
    perm = torch.randperm(N, generator=g)
    sent = perm[perm < R].cuda()  # pad tokens (the last npad) have unsent slots
    rows = (torch.randn(R, D, generator=g) * 3).to(torch.bfloat16).cuda()
    w = torch.rand(T, K, generator=g).cuda()
    ref = _weighted_sum(scatter_to_slots(rows, sent, N).view(T, K, D), w)
    out = fc.weighted_combine(rows, sent, w)
    assert torch.equal(out, ref)


@cuda
def test_moe_forward_fused_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast router (inference only, not bitwise the torch router's gate values) off:
    # both calls route alike, so the combine is what is compared.
    monkeypatch.setattr(fr, "FAST_ROUTER", False)
    cfg = sm.MoEConfig(dim=256, hidden_dim=128, num_experts=16, top_k=4, score_func="softmax",
                       route_norm=True, param_dtype=torch.bfloat16)
    moe = sm.MoE(cfg, device="cuda")
    moe.init_states(seed=3)
    x = torch.randn(333, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_fused = moe(x)  # fused combine
    y_ref = moe(x.clone().requires_grad_(True))  # autograd: the unfused path
    assert torch.equal(y_fused, y_ref.detach())
