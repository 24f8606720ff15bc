"""Checks that run before vLLM starts its workers (no vLLM import at module level).

vLLM calls ``MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)`` while
it builds the ``VllmConfig`` in the process that calls ``LLM(...)`` / ``vllm serve`` (the
engine front end), before any worker process exists. :func:`register` adds
:class:`SpmdVerifyConfig` under each Spmd* architecture, so

* unsupported engine arguments (``enable_expert_parallel``, pipeline parallelism,
  quantization, LoRA, EPLB, a TP size that does not divide the experts) and
* a checkpoint whose MoE tensors do not fit the config (a missing or duplicated expert, a
  mis-shaped tensor, an expert id >= E, expert weights on a dense layer, a missing router
  or shared-expert tensor), read from the safetensors headers without loading a tensor,

raise :class:`EngineArgumentError` / :class:`spmd_moe.CheckpointError` as the error the
user's ``LLM(...)`` call raises, in well under a second, with the checkpoint tensor's
name. The model's ``__init__`` and ``load_weights`` repeat the same checks in every
worker (for models built without this hook), with the same messages on every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from spmd_moe.errors import CheckpointError, ConfigError, SpmdMoeError
from spmd_moe.integrations.vllm import weights as W
from spmd_moe.integrations.vllm.families import BY_SPMD_ARCH, Family, family_of

# "0" skips the front end's read of the safetensors headers (e.g. a checkpoint on a slow
# network file system); the workers' load_weights still checks every tensor, with the
# same messages on every rank.
PRECHECK_ENV = "SPMD_MOE_VLLM_PRECHECK"


class EngineArgumentError(SpmdMoeError, RuntimeError):
    """An engine argument the spmd_moe model does not support, refused in vLLM's front end.

    Not a ValueError (unlike ConfigError, which the model raises in the workers): vLLM
    builds its config as a pydantic dataclass, and pydantic would wrap a ValueError in
    its ValidationError. This way the error ``LLM(...)`` raises is this one."""


def refuse_engine_args(vllm_config: Any, arch: str, exc: type[Exception] = ConfigError) -> None:
    """Raise ``exc`` (ConfigError in the model, EngineArgumentError in the front end) for
    an engine argument the spmd_moe model cannot honour."""
    pc = vllm_config.parallel_config
    mc = vllm_config.model_config
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise exc(
            f"pipeline_parallel_size: expected 1 for {arch}, got {pp}. spmd_moe's MoE layers "
            "shard the experts over the tensor-parallel group (EP = TP). Fix: drop "
            "pipeline_parallel_size and use tensor_parallel_size instead."
        )
    if getattr(pc, "enable_expert_parallel", False):
        raise exc(
            "enable_expert_parallel: expected False, got True. spmd_moe layers already "
            "shard the experts over the TP group (EP = TP); vLLM's flag only drives its "
            "own fused-MoE kernels. Fix: drop enable_expert_parallel and set "
            "tensor_parallel_size to the EP size you want."
        )
    if getattr(pc, "enable_eplb", False):
        raise exc(
            f"enable_eplb: expected False for {arch}, got True (vLLM's expert load balancer "
            "moves its own fused-MoE weights). Fix: drop enable_eplb."
        )
    refuse_quantization(mc, arch, getattr(vllm_config, "quant_config", None), exc)
    if getattr(vllm_config, "lora_config", None) is not None:
        raise exc(
            f"enable_lora: expected False for {arch}, got True (LoRA adapters would target "
            "vLLM's fused-MoE layers, which this model does not have). Fix: drop enable_lora."
        )
    hf = mc.hf_text_config
    try:
        fam = family_of(hf)
    except ConfigError as e:
        raise exc(str(e)) from None
    if fam.spmd_arch != arch:
        raise exc(
            f"architecture {arch!r}: expected a {BY_SPMD_ARCH[arch].model_type} config, got "
            f"model_type {fam.model_type!r}. Fix: override the architecture with {fam.spmd_arch!r}."
        )
    tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    E = fam.num_experts(hf)
    if E % tp != 0:
        raise exc(
            f"tensor_parallel_size: expected a divisor of num_experts={E} (EP = TP: each rank "
            f"holds E/tp experts), got {tp}. Fix: use tensor_parallel_size in "
            f"{[d for d in range(1, E + 1) if E % d == 0]}."
        )
    shared = fam.shared_hidden(hf)
    if shared and shared % tp != 0:
        raise exc(
            f"tensor_parallel_size: expected a divisor of shared_expert_intermediate_size="
            f"{shared} (the shared expert is split over the TP ranks), got {tp}. Fix: choose a "
            "TP size that divides it."
        )


def refuse_quantization(model_config: Any, arch: str, quant_config: Any = None, exc: type[Exception] = ConfigError) -> None:
    """Raise ConfigError for ``quantization=`` or a quantized checkpoint (its config's
    quantization_config)."""
    quant = getattr(model_config, "quantization", None)
    if not quant:
        qc = getattr(getattr(model_config, "hf_config", None), "quantization_config", None)
        if qc:
            quant = qc.get("quant_method", "a quantization_config") if isinstance(qc, dict) else type(qc).__name__
    if not quant and quant_config is not None:
        quant = type(quant_config).__name__
    if quant:
        raise exc(
            f"quantization: expected none for {arch}, got {quant!r}. Fix: serve an unquantized "
            "(fp32/bf16/fp16) checkpoint and drop quantization=; spmd_moe experts run plain "
            "grouped GEMMs."
        )


def checkpoint_shapes(folder: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers of a local folder (no tensor
    is read), or None when the folder is not local or holds no safetensors."""
    root = Path(folder)
    if not root.is_dir():
        return None
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(int(d) for d in meta["shape"])
    return shapes


def check_moe_tensors(shapes: dict[str, tuple[int, ...]], hf: Any, fam: Family, tp: int = 1) -> None:
    """Validate the MoE tensors of a checkpoint (name -> shape) against the config with
    the loader's own functions (same messages); raise CheckpointError naming the tensor."""
    E, D, F = fam.num_experts(hf), int(hf.hidden_size), fam.expert_hidden(hf)
    S = fam.shared_hidden(hf)
    L = int(hf.num_hidden_layers)
    blocks = {f"model.layers.{i}.{fam.block_attr}": i for i in range(L) if fam.is_moe_layer(hf, i)}
    ledger = W.ExpertLedger()
    for name in sorted(shapes):
        if not (W.is_expert_weight(name) or W.is_shared_weight(name) or W.router_param(name)):
            continue
        block = W.moe_prefix_of(name) or ""
        if block not in blocks:
            raise CheckpointError(
                f"checkpoint weight '{name}': expert weights for '{block}', which is not an MoE "
                f"layer of this model (MoE layers: {sorted(blocks)[:4]}...). Fix: check "
                "mlp_only_layers / decoder_sparse_step / num_hidden_layers of the config."
            )
        t = torch.empty(shapes[name], device="meta")
        if W.is_expert_weight(name):
            W.expert_copies(name, t, num_experts=E, hidden_dim=F, dim=D, e0=0, e1=0)
            ledger.note(name, E)
        elif W.is_shared_weight(name):
            if not S:
                raise CheckpointError(
                    f"checkpoint weight '{name}': unexpected, the config has no shared expert "
                    "(shared_expert_intermediate_size=0). Fix: set it in the config or drop the tensor."
                )
            W.shared_copy(name, t, shared_hidden=S, dim=D, size=1, rank=0)
        elif tuple(t.shape) != (E, D):
            raise CheckpointError(
                f"checkpoint weight '{name}': expected shape {(E, D)}, got {tuple(t.shape)}. "
                "Fix: check hidden_size / num_experts of the config against the checkpoint."
            )
    ledger.check_all_experts({b: E for b in blocks}, fam.expert_name)
    for b in sorted(blocks):
        need = [f"{b}.gate.weight"]
        if S:
            need += [f"{b}.shared_expert.{k}.weight" for k in ("gate_proj", "up_proj", "down_proj")]
            need.append(f"{b}.shared_expert_gate.weight")
        for n in need:
            if n not in shapes:
                raise CheckpointError(
                    f"checkpoint weight '{n}': expected in the checkpoint, got no such tensor. "
                    "Fix: check that the checkpoint matches the config (num_hidden_layers, "
                    "shared_expert_intermediate_size)."
                )


class SpmdVerifyConfig:
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``), run in the engine
    front end before workers start."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        mc = vllm_config.model_config
        arch = mc.architecture
        refuse_engine_args(vllm_config, arch, EngineArgumentError)
        if os.environ.get(PRECHECK_ENV, "1") == "0":
            return
        shapes = checkpoint_shapes(mc.model)
        if shapes is not None:
            hf = mc.hf_text_config
            check_moe_tensors(shapes, hf, family_of(hf), int(vllm_config.parallel_config.tensor_parallel_size))

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        # Runs inside ModelConfig, just before vLLM verifies the quantization method
        # (which would otherwise fail first with vLLM's own message on some devices).
        refuse_quantization(model_config, model_config.architecture, None, EngineArgumentError)
