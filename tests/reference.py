"""A float64, one-token-at-a-time MoE written from the definitions (torchtitan's router
semantics, SwiGLU experts), used as the reference nobody optimised."""

from __future__ import annotations

import torch

from spmd_moe.config import MoEConfig


def reference_moe(
    cfg: MoEConfig,
    full_sd: dict[str, torch.Tensor],
    x_TD: torch.Tensor,
    routes_out: list[list[int]] | None = None,
) -> torch.Tensor:
    """full_sd: the unsharded state dict (MoE.state_dict() at EP size 1).

    Differentiable: pass float64 leaf tensors (x_TD and full_sd values) that require
    grad and call backward on the result to get reference gradients. routes_out, if
    given, receives each token's chosen expert ids in ascending order.
    """
    d = torch.float64
    x = x_TD.to(d)
    gate = full_sd["router.gate.weight"].to(d)
    w1 = full_sd["routed_experts.inner_experts.w1_EFD"].to(d)
    w2 = full_sd["routed_experts.inner_experts.w2_EDF"].to(d)
    w3 = full_sd["routed_experts.inner_experts.w3_EFD"].to(d)
    bias = full_sd.get("expert_bias_E")
    outs = []
    for t in range(x.shape[0]):
        xt = x[t]
        logits = gate @ xt
        scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, -1)
        choice = scores + bias.to(d) if bias is not None else scores.clone()
        if cfg.num_expert_groups is not None:
            assert cfg.num_limited_groups is not None
            g = cfg.num_expert_groups
            per = cfg.num_experts // g
            gscore = [sorted(choice[i * per:(i + 1) * per].tolist(), reverse=True)[:2] for i in range(g)]
            gsum = torch.tensor([sum(s) for s in gscore], dtype=d)
            keep = set(torch.topk(gsum, cfg.num_limited_groups).indices.tolist())
            for i in range(g):
                if i not in keep:
                    choice[i * per:(i + 1) * per] = float("-inf")
        ids = torch.topk(choice, cfg.top_k).indices
        if routes_out is not None:
            routes_out.append(sorted(ids.tolist()))
        w = scores[ids]
        if cfg.route_norm:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.route_scale
        y = torch.zeros_like(xt)
        for k, e in enumerate(ids.tolist()):
            h = torch.nn.functional.silu(w1[e] @ xt) * (w3[e] @ xt)
            y = y + w[k] * (w2[e] @ h)
        if cfg.shared_hidden_dim is not None:
            s1, s2, s3 = (full_sd[f"shared_experts.{n}.weight"].to(d) for n in ("w1", "w2", "w3"))
            y = y + s2 @ (torch.nn.functional.silu(s1 @ xt) * (s3 @ xt))
        outs.append(y)
    return torch.stack(outs) if outs else x.new_zeros(0, x.shape[1])
