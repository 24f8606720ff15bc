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

__all__ = ["qwen3_moe_debug", "qwen3_debugmodel_moe_param_groups", "qwen3_30b_a3b", "qwen3_moe_tiny", "with_spmd_moe"]


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


def qwen3_moe_tiny() -> Any:
    """A CPU-sized smoke config: torchtitan's qwen3_moe_debug settings with a 2-layer Qwen3
    MoE (D=64, E=8, top-2, vocab 256, SDPA attention: torchtitan's flex attention has no
    CPU backward), seq_len 64, batch 2, 4 steps, no activation checkpointing, no CUDA
    graphs. Give it a tokenizer and corpus (spmd_moe.integrations.torchtitan.tiny_assets):
    --hf_assets_path DIR/tokenizer --dataloader.dataset_path DIR/corpus."""
    from torchtitan.components.loss import CrossEntropyLoss

    from spmd_moe.integrations.torchtitan import tiny_qwen3_moe_config

    config = _qwen3.qwen3_moe_debug()
    spec = config.model_spec
    spec.flavor = "tiny_moe"
    spec.model = tiny_qwen3_moe_config(vocab_size=256, max_seq_len=256)
    config.loss = CrossEntropyLoss.Config(global_vocab_size=256)
    config.training.seq_len = 64
    config.training.local_batch_size = 2
    config.training.steps = 4
    config.training.disable_cuda_graphs = True
    config.checkpoint.enable = False
    return with_spmd_moe(config)
