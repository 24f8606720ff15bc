"""vLLM plugin: registers SpmdQwen3MoeForCausalLM and the ``spmd_moe`` config format.

vLLM calls :func:`register` in every process (entry point group
``vllm.general_plugins``, declared in pyproject.toml), so installing spmd_moe is all a
user does; nothing in vLLM is edited. Then either

* an HF Qwen3-MoE folder: ``LLM(model=folder, hf_overrides={"architectures":
  ["SpmdQwen3MoeForCausalLM"]})``, or
* a folder with ``spmd_moe.json`` + safetensors: ``LLM(model=folder,
  config_format="spmd_moe")``.

This module imports nothing heavy at import time; the model module is imported lazily
by vLLM's registry (in a fresh interpreter when it inspects the class).
"""

from __future__ import annotations

from spmd_moe.integrations.vllm.names import SPMD_ARCH, SPMD_FORMAT

MODEL_CLASS_PATH = "spmd_moe.integrations.vllm.model:SpmdQwen3MoeForCausalLM"
ARCHITECTURES = (SPMD_ARCH,)
CONFIG_FORMAT = SPMD_FORMAT


def register() -> None:
    """Register the architecture and the config parser with vLLM (idempotent)."""
    from vllm import ModelRegistry

    if SPMD_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(SPMD_ARCH, MODEL_CLASS_PATH)

    from vllm.transformers_utils import config as vllm_config_mod

    from spmd_moe.integrations.vllm.config_parser import SpmdMoeConfigParser

    registry = getattr(vllm_config_mod, "_CONFIG_FORMAT_TO_CONFIG_PARSER", {})
    if registry.get(CONFIG_FORMAT) is not SpmdMoeConfigParser:
        vllm_config_mod.register_config_parser(CONFIG_FORMAT)(SpmdMoeConfigParser)


__all__ = ["ARCHITECTURES", "CONFIG_FORMAT", "MODEL_CLASS_PATH", "register"]
