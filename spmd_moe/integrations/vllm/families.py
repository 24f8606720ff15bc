"""The MoE model families the vLLM plugin serves, as data (no vLLM import).

Each family names vLLM's own model class, the sparse-MoE block class the plugin swaps
for ``spmd_moe.MoE`` while that class is built, and how the HF config and the checkpoint
describe the block:

=================  ===========================  ==========================================
family             HF block (checkpoint prefix)  spmd_moe MoEConfig
=================  ===========================  ==========================================
Qwen3-MoE          ``mlp``                       softmax, route_norm = norm_topk_prob
                                                 (optional shared expert + sigmoid gate)
Qwen2-MoE          ``mlp``                       softmax, route_norm = norm_topk_prob,
                                                 shared expert (shared_expert_intermediate_size)
                                                 scaled by sigmoid(shared_expert_gate(x))
Mixtral            ``block_sparse_moe``          softmax, route_norm = True (Mixtral always
                                                 renormalizes its top-k)
=================  ===========================  ==========================================

Checkpoint names per MoE layer ``P`` = ``model.layers.{i}.<block>``: router ``P.gate.weight``
[E, D]; routed experts per expert ``P.experts.{e}.{gate,up,down}.weight`` with the family's
spelling (``gate_proj/up_proj/down_proj``, Mixtral ``w1/w3/w2``) or fused
``P.experts.gate_up_proj`` [E, 2F, D] / ``P.experts.down_proj`` [E, D, F]; shared expert
``P.shared_expert.{gate,up,down}_proj.weight`` and ``P.shared_expert_gate.weight`` [1, D].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spmd_moe.config import MoEConfig, PaddingPolicy
from spmd_moe.errors import ConfigError

# Padding policy of every MoE layer (MoEConfig.padding has no default): 'pad', because a
# vLLM step's token count is whatever the scheduler batched, and a decode step with fewer
# tokens than TP ranks (T=1 at TP=2) or any T not a multiple of TP is normal; pad rows
# are never routed or counted and are sliced off, so padding changes no output.
PADDING: PaddingPolicy = "pad"


@dataclass(frozen=True)
class Family:
    model_type: str  # HF config model_type
    native_arch: str  # vLLM's (and HF's) architecture name
    spmd_arch: str  # the plugin's architecture name (hf_overrides={"architectures": [...]})
    vllm_module: str  # module of vLLM's model class
    block_class: str  # global name in vllm_module of the sparse block swapped at build time
    model_class: str  # global name in vllm_module of the (torch.compile-decorated) base model
    block_attr: str  # the decoder layer's attribute (and checkpoint name) of the MoE block
    expert_kinds: tuple[str, str, str]  # checkpoint names of (gate, up, down) per expert

    def expert_name(self, block_prefix: str, expert: int, which: str) -> str:
        """The checkpoint tensor name of one routed expert's weight (which: gate/up/down)."""
        kind = self.expert_kinds[("gate", "up", "down").index(which)]
        return f"{block_prefix}.experts.{expert}.{kind}.weight"

    def num_experts(self, hf: Any) -> int:
        return int(hf.num_local_experts if self.model_type == "mixtral" else hf.num_experts)

    def expert_hidden(self, hf: Any) -> int:
        return int(hf.intermediate_size if self.model_type == "mixtral" else hf.moe_intermediate_size)

    def shared_hidden(self, hf: Any) -> int:
        if self.model_type == "mixtral":
            return 0
        return int(getattr(hf, "shared_expert_intermediate_size", 0) or 0)

    def is_moe_layer(self, hf: Any, layer_idx: int) -> bool:
        if self.model_type == "mixtral":
            return True
        only_dense = list(getattr(hf, "mlp_only_layers", None) or [])
        step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
        return layer_idx not in only_dense and self.num_experts(hf) > 0 and (layer_idx + 1) % step == 0

    def moe_config(self, hf: Any, dtype: torch.dtype) -> MoEConfig:
        """The MoEConfig of one sparse block of this family."""
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(
                f"model config hidden_act: expected 'silu' (SwiGLU experts), got {act!r}. "
                f"Fix: serve this model with vLLM's native {self.native_arch}."
            )
        shared = self.shared_hidden(hf)
        if self.model_type == "mixtral":
            route_norm = True
        else:  # HF defaults: Qwen3-MoE normalizes, Qwen2-MoE does not
            route_norm = bool(getattr(hf, "norm_topk_prob", self.model_type == "qwen3_moe"))
        return MoEConfig(
            dim=int(hf.hidden_size),
            hidden_dim=self.expert_hidden(hf),
            num_experts=self.num_experts(hf),
            top_k=int(hf.num_experts_per_tok),
            score_func="softmax",
            route_norm=route_norm,
            shared_hidden_dim=shared or None,
            shared_gate=shared > 0,
            param_dtype=dtype,
            padding=PADDING,
        )


QWEN3_MOE = Family(
    "qwen3_moe", "Qwen3MoeForCausalLM", "SpmdQwen3MoeForCausalLM", "vllm.model_executor.models.qwen3_moe",
    "Qwen3MoeSparseMoeBlock", "Qwen3MoeModel", "mlp", ("gate_proj", "up_proj", "down_proj"),
)
QWEN2_MOE = Family(
    "qwen2_moe", "Qwen2MoeForCausalLM", "SpmdQwen2MoeForCausalLM", "vllm.model_executor.models.qwen2_moe",
    "Qwen2MoeSparseMoeBlock", "Qwen2MoeModel", "mlp", ("gate_proj", "up_proj", "down_proj"),
)
MIXTRAL = Family(
    "mixtral", "MixtralForCausalLM", "SpmdMixtralForCausalLM", "vllm.model_executor.models.mixtral",
    "MixtralMoE", "MixtralModel", "block_sparse_moe", ("w1", "w3", "w2"),
)
FAMILIES: tuple[Family, ...] = (QWEN3_MOE, QWEN2_MOE, MIXTRAL)
BY_SPMD_ARCH = {f.spmd_arch: f for f in FAMILIES}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family_of(hf: Any) -> Family:
    """The family of an HF config (by model_type), or ConfigError."""
    mtype = getattr(hf, "model_type", None)
    fam = BY_MODEL_TYPE.get(str(mtype))
    if fam is None:
        raise ConfigError(
            f"model config model_type: expected one of {sorted(BY_MODEL_TYPE)} for the spmd_moe "
            f"vLLM plugin, got {mtype!r}. Fix: serve this model with vLLM's native class (drop "
            "the Spmd* architecture override)."
        )
    return fam
