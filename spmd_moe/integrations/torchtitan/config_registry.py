"""Ready torchtitan config functions for the Qwen3 MoE flavors with spmd_moe's MoE.

    torchrun --nproc_per_node 1 -m torchtitan.train \\
        --module spmd_moe.integrations.torchtitan --config qwen3_moe_debug

torchtitan's ConfigManager imports ``<module>.config_registry`` and calls the named
function. Each function here is torchtitan's own Qwen3 config of that name with the
spmd_moe override (spmd_moe.integrations.torchtitan.overrides.spmd_moe) added to
``override.imports``; every other setting and every CLI flag is torchtitan's.
"""

from __future__ import annotations

from typing import Any

from torchtitan.models.qwen3 import config_registry as _qwen3

from spmd_moe.integrations.torchtitan.overrides import TARGET

__all__ = ["qwen3_moe_debug", "qwen3_debugmodel_moe_param_groups", "qwen3_30b_a3b", "with_spmd_moe"]


def with_spmd_moe(config: Any) -> Any:
    """Add the spmd_moe override to a torchtitan Trainer.Config (once)."""
    imports = config.override.imports
    if not any((e if isinstance(e, str) else e[0]) == TARGET for e in imports):
        imports.append(TARGET)
    return config


def qwen3_moe_debug() -> Any:
    """torchtitan's qwen3_moe_debug (debugmodel_moe: 8 layers, D=256, E=64, top-8) with spmd_moe."""
    return with_spmd_moe(_qwen3.qwen3_moe_debug())


def qwen3_debugmodel_moe_param_groups() -> Any:
    """torchtitan's qwen3_debugmodel_moe_param_groups (router gate in its own group) with spmd_moe."""
    return with_spmd_moe(_qwen3.qwen3_debugmodel_moe_param_groups())


def qwen3_30b_a3b() -> Any:
    """torchtitan's qwen3_30b_a3b (Qwen3-30B-A3B: 48 layers, E=128, top-8) with spmd_moe."""
    return with_spmd_moe(_qwen3.qwen3_30b_a3b())
