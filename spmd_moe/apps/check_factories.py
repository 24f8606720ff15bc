"""`spmd-moe check` factories for the project's own models (docs/check.md).

    spmd-moe check spmd_moe.apps.check_factories:moe_replicated      # and the others below

* ``moe_replicated`` / ``moe_invariant`` / ``moe_sequence``: ``spmd_moe.MoE`` in each
  layout, shared experts on, aux-loss-free expert bias on, softmax routing.
* ``moe_sequence_grouped``: sigmoid scores, group-limited routing (DeepSeek-V3 style),
  route scale, no shared experts, the all-to-all dispatcher forced.
* ``vllm_qwen3_moe_block`` / ``vllm_qwen2_moe_block`` / ``vllm_mixtral_block``: the
  plugin's ``SpmdMoEBlock`` (the module vLLM's own decoder layers get in place of
  their sparse-MoE block: its forward, the family's MoEConfig with the plugin's
  padding policy, layout 'replicated' on a group named 'tp', the meta -> to_empty ->
  init_states path) for tiny configs of each family (Qwen3-MoE: the project's tiny
  checkpoint's). Only the block, and on a plain gloo group: the whole model needs a
  vLLM engine (attention, KV cache, scheduler, vLLM's TP group and communicator),
  which a gloo check world does not have.
* ``torchtitan_sequence_parallel`` / ``torchtitan_tensor_parallel``: the torchtitan
  adapter's ``SpmdMoE`` built from torchtitan's own tiny Qwen3 MoE config
  (``use_spmd_moe``), parallelized by its own ``parallelize`` (layout chosen by
  ``choose_layout``: 'sequence' with sequence parallel, 'invariant' without), input
  ``[1, T, D]`` as torchtitan hands it over. The ParallelDims given to ``parallelize``
  is a stand-in with tp = ep = the world size whose 'ep' mesh returns the check's
  group (torchtitan's real ParallelDims would build its own process groups).
"""

from __future__ import annotations

from typing import Any

import torch

from spmd_moe.apps.check import CheckTarget
from spmd_moe.config import MoEConfig
from spmd_moe.moe import MoE
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP

__all__ = [
    "moe_replicated", "moe_invariant", "moe_sequence", "moe_sequence_grouped",
    "vllm_qwen3_moe_block", "vllm_qwen2_moe_block", "vllm_mixtral_block", "torchtitan_sequence_parallel", "torchtitan_tensor_parallel",
]


def _cfg(**over: Any) -> MoEConfig:
    base: dict[str, Any] = dict(dim=16, hidden_dim=8, num_experts=8, top_k=2, padding="pad",
                                shared_hidden_dim=8, load_balance_coeff=1e-3)
    base.update(over)
    return MoEConfig(**base)


def moe_replicated(pctx: ParallelContext[EP]) -> MoE[Any]:
    moe = MoE(_cfg(), pctx, layout="replicated")
    moe.init_states(seed=0)
    return moe


def moe_invariant(pctx: ParallelContext[EP]) -> MoE[Any]:
    moe = MoE(_cfg(), pctx, layout="invariant")
    moe.init_states(seed=0)
    return moe


def moe_sequence(pctx: ParallelContext[EP]) -> MoE[Any]:
    moe = MoE(_cfg(), pctx, layout="sequence")
    moe.init_states(seed=0)
    return moe


def moe_sequence_grouped(pctx: ParallelContext[EP]) -> MoE[Any]:
    cfg = _cfg(score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4,
               num_limited_groups=2, shared_hidden_dim=None, dispatcher="all_to_all")
    moe = MoE(cfg, pctx, layout="sequence")
    moe.init_states(seed=0)
    return moe


def _vllm_block(pctx: ParallelContext[EP], hf: Any) -> MoE[Any]:
    """The plugin's SpmdMoEBlock for the HF config ``hf``, built as the plugin builds
    it (the family's MoEConfig, layout 'replicated', meta -> to_empty -> init_states)
    but on the check's group: SpmdMoEBlock.__init__ itself reads vLLM's current config
    and TP group, which only a vLLM engine sets up."""
    from spmd_moe.integrations.vllm.families import family_of
    from spmd_moe.integrations.vllm.model import INIT_SEED, SpmdMoEBlock

    fam = family_of(hf)
    cfg = fam.moe_config(hf, torch.float32)
    tp = ParallelContext.from_group(pctx.group, "tp")  # the plugin's axis is vLLM's TP group
    block = SpmdMoEBlock.__new__(SpmdMoEBlock)
    MoE.__init__(block, cfg, tp, layout="replicated", device="meta", name=f"model.layers.0.{fam.block_attr}")
    block.to_empty(device=torch.device("cpu"))
    block.init_states(seed=INIT_SEED)
    block.cpu_fused = None  # the plugin packs vLLM's CPU op after load_weights; the check runs spmd_moe's path
    return block


def vllm_qwen3_moe_block(pctx: ParallelContext[EP]) -> MoE[Any]:
    """Qwen3-MoE, the hyperparameters of the project's tiny checkpoint (TinySpec)."""
    from transformers import Qwen3MoeConfig

    from spmd_moe.apps.tiny_checkpoint import TinySpec

    return _vllm_block(pctx, Qwen3MoeConfig(**TinySpec().hf_config_kwargs()))


def vllm_qwen2_moe_block(pctx: ParallelContext[EP]) -> MoE[Any]:
    """Qwen2-MoE: shared expert scaled by its sigmoid gate, no top-k renormalization."""
    from transformers import Qwen2MoeConfig

    return _vllm_block(pctx, Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu"))


def vllm_mixtral_block(pctx: ParallelContext[EP]) -> MoE[Any]:
    """Mixtral: 'block_sparse_moe', top-k always renormalized."""
    from transformers import MixtralConfig

    return _vllm_block(pctx, MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu"))


class _Mesh:
    def __init__(self, group: Any) -> None:
        self._group = group

    def get_group(self) -> Any:
        return self._group


class _Dims:
    """What SpmdMoE.parallelize reads of torchtitan's ParallelDims: TP2EP on the check's group."""

    def __init__(self, pctx: ParallelContext[EP]) -> None:
        self.tp = self.ep = pctx.size
        self.ep_enabled = pctx.size > 1
        self._mesh = _Mesh(pctx.group)

    def get_optional_mesh(self, name: str) -> _Mesh | None:
        return self._mesh if name == "ep" else None


def _titan(pctx: ParallelContext[EP], sequence_parallel: bool) -> CheckTarget:
    from spmd_moe.integrations.torchtitan import tiny_qwen3_moe_config, use_spmd_moe

    cfg = use_spmd_moe(tiny_qwen3_moe_config(n_layers=1), sequence_parallel=sequence_parallel)
    moe = cfg.layers[0].moe.build()
    moe.init_states(seed=0)
    moe.parallelize(_Dims(pctx))
    dim = int(moe.cfg.dim)

    def tokens_1TD(T: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(1, T, dim, generator=g, dtype=torch.float64).float()

    return CheckTarget(moe, moe.layout, dim, make_input=tokens_1TD)


def torchtitan_sequence_parallel(pctx: ParallelContext[EP]) -> CheckTarget:
    return _titan(pctx, True)


def torchtitan_tensor_parallel(pctx: ParallelContext[EP]) -> CheckTarget:
    return _titan(pctx, False)
