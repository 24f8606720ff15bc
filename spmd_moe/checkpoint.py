"""Sharding a full (EP size 1) state dict for one rank, with strict key checks."""

from __future__ import annotations

from typing import Any

import torch

from spmd_moe.config import MoEConfig
from spmd_moe.errors import CheckpointError
from spmd_moe.parallel import ParallelContext

EXPERT_KEYS = ("routed_experts.inner_experts.w1_EFD", "routed_experts.inner_experts.w2_EDF", "routed_experts.inner_experts.w3_EFD")
SHARED_ROW = ("shared_experts.w1.weight", "shared_experts.w3.weight")  # column-parallel: split dim 0
SHARED_COL = ("shared_experts.w2.weight",)  # row-parallel: split dim 1
SHARED_GATE = "shared_experts.gate.weight"  # [1, D], replicated (MoEConfig.shared_gate)


def full_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    E, F, D = cfg.num_experts, cfg.hidden_dim, cfg.dim
    shapes: dict[str, tuple[int, ...]] = {
        "router.gate.weight": (E, D),
        EXPERT_KEYS[0]: (E, F, D),
        EXPERT_KEYS[1]: (E, D, F),
        EXPERT_KEYS[2]: (E, F, D),
    }
    if cfg.shared_hidden_dim is not None:
        S = cfg.shared_hidden_dim
        shapes.update({SHARED_ROW[0]: (S, D), SHARED_ROW[1]: (S, D), SHARED_COL[0]: (D, S)})
        if cfg.shared_gate:
            shapes[SHARED_GATE] = (1, D)
    if cfg.load_balance_coeff is not None:
        shapes["expert_bias_E"] = (E,)
    return shapes


def shard_state_dict(
    full_sd: dict[str, torch.Tensor], cfg: MoEConfig, pctx: ParallelContext[Any], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """This rank's slice of a full MoE state dict: experts E/n, shared hidden dim /n."""
    want = full_shapes(cfg)
    keys = {k[len(prefix):] for k in full_sd if k.startswith(prefix)}
    for k in sorted(keys - set(want)):
        raise CheckpointError(
            f"state dict key '{prefix}{k}': unexpected for this MoEConfig (expected keys: "
            f"{sorted(prefix + w for w in want)}). Fix: drop it or use the config the "
            "checkpoint was saved with."
        )
    for k in sorted(set(want) - keys):
        raise CheckpointError(
            f"state dict key '{prefix}{k}': missing (expected shape {want[k]}). Fix: load a "
            "checkpoint saved from a model with this config, or convert its names."
        )
    out: dict[str, torch.Tensor] = {}
    n, r = pctx.size, pctx.rank
    e0, e1 = pctx.local_experts(cfg.num_experts)
    for k, shape in want.items():
        t = full_sd[prefix + k]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"state dict key '{prefix}{k}': expected shape {shape}, got {tuple(t.shape)}. "
                "Fix: check dim / hidden_dim / num_experts of the MoEConfig against the checkpoint."
            )
        if k in EXPERT_KEYS:
            t = t[e0:e1]
        elif k in SHARED_ROW:
            t = t.chunk(n, dim=0)[r]
        elif k in SHARED_COL:
            t = t.chunk(n, dim=1)[r]
        out[k] = t.clone()
    return out
