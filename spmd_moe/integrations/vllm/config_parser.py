"""The ``spmd_moe`` config format for vLLM: a model folder with ``spmd_moe.json`` and
safetensors, no HF ``config.json``.

``spmd_moe.json``::

    {"format": "spmd_moe", "format_version": 1,
     "architecture": "SpmdQwen3MoeForCausalLM",   # the class vLLM builds
     "model_type": "qwen3_moe",                   # or "qwen2_moe", "mixtral"
     "model": {...hyperparameters, the HF config's field names...}}

Select it with ``LLM(model=folder, config_format="spmd_moe")`` (or ``--config-format
spmd_moe``). The parser turns the file into the transformers config of ``model_type``
(``Qwen3MoeConfig``, ``Qwen2MoeConfig``, ``MixtralConfig``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm.transformers_utils.config_parser_base import ConfigParserBase

from spmd_moe.errors import ConfigError
from spmd_moe.integrations.vllm.families import BY_MODEL_TYPE
from spmd_moe.integrations.vllm.names import SPMD_CONFIG_NAME, SPMD_FORMAT

FORMAT_NAME = SPMD_FORMAT
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


def read_spmd_config(model: str | Path) -> tuple[dict[str, Any], Any]:
    """Read ``<model>/spmd_moe.json`` -> (its dict, a transformers PretrainedConfig)."""
    folder = Path(model)
    path = folder / SPMD_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"config_format '{FORMAT_NAME}': expected the file {path}, got "
            f"{'no such folder' if not folder.is_dir() else 'a folder without it'}. Fix: pass a "
            f"local folder holding {SPMD_CONFIG_NAME} and the safetensors, or drop "
            "config_format for an HF folder with config.json."
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: expected JSON, got a parse error: {e}. Fix: repair the file.") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"{path}: expected \"format\": \"{FORMAT_NAME}\", got {got!r}. Fix: write the spmd_moe config format.")
    mtype = d.get("model_type", "qwen3_moe")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{path}: model_type: expected one of {SUPPORTED_MODEL_TYPES}, got {mtype!r}. Fix: use a family the plugin maps.")
    fam = BY_MODEL_TYPE[mtype]
    archs = (fam.spmd_arch, fam.native_arch)
    arch = d.get("architecture", fam.spmd_arch)
    if arch not in archs:
        raise ConfigError(f"{path}: architecture: expected one of {archs} for model_type {mtype!r}, got {arch!r}. Fix: use {fam.spmd_arch!r}.")
    fields = d.get("model")
    if not isinstance(fields, dict):
        raise ConfigError(f"{path}: expected a \"model\" object of hyperparameters, got {type(fields).__name__}. Fix: add it.")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(mtype, **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: \"model\": expected {mtype} config fields, got an error: {e}. Fix: correct the fields.") from e
    cfg.architectures = [arch]
    return d, cfg


class SpmdMoeConfigParser(ConfigParserBase):  # type: ignore[misc]
    def parse(
        self,
        model: str | Path,
        trust_remote_code: bool,
        revision: str | None = None,
        code_revision: str | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], Any]:
        # hf_overrides are applied by vLLM's get_config after this returns.
        return read_spmd_config(model)
