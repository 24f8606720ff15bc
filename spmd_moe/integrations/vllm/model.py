"""SpmdQwen3MoeForCausalLM: a Qwen3-MoE model for vLLM whose MoE layers are spmd_moe.MoE.

Dense parts are vLLM's own parallel layers (VocabParallelEmbedding, QKVParallelLinear,
RowParallelLinear, RMSNorm, get_rope, Attention, ParallelLMHead, LogitsProcessor), so
attention and the LM head are tensor-parallel exactly as in vLLM's native model. Each
MoE layer is ``spmd_moe.MoE(layout='replicated')`` on vLLM's TP group: it takes the
hidden states replicated over the TP ranks, splits the tokens over them, routes, sends
rows to the rank owning each expert (EP = TP: rank r holds experts [r*E/n, (r+1)*E/n)),
and all-gathers the result back to replicated. No vLLM MoE kernel is used, so this runs
wherever vLLM's TP runs, CPU included.

Shape suffixes: T tokens (flattened over sequences), D hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size, get_tp_group
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from spmd_moe import _debug
from spmd_moe.config import MoEConfig, PaddingPolicy
from spmd_moe.errors import CheckpointError, ConfigError
from spmd_moe.integrations.vllm import weights as W
from spmd_moe.integrations.vllm.comm import vllm_tp_context
from spmd_moe.moe import MoE, Replicated
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, as_rep

# checkpoint sub-name -> (our parameter sub-name, shard id of vLLM's merged layer)
_STACKED: tuple[tuple[str, str, Any], ...] = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
_SHARDS_OF: dict[str, set[Any]] = {".qkv_proj.": {"q", "k", "v"}, ".gate_up_proj.": {0, 1}}
INIT_SEED = 0  # init_states seed: every weight is then overwritten by load_weights
# Padding policy of every MoE layer (MoEConfig.padding has no default): 'pad', because a
# vLLM step's token count is whatever the scheduler batched, and a decode step with fewer
# tokens than TP ranks (T=1 at TP=2) or any T not a multiple of TP is normal; pad rows
# are never routed or counted and are sliced off, so padding changes no output.
PADDING: PaddingPolicy = "pad"


def moe_config_from_hf(hf: Any, dtype: torch.dtype) -> MoEConfig:
    """The MoEConfig of one Qwen3-MoE sparse block (softmax top-k, optional renorm)."""
    shared = int(getattr(hf, "shared_expert_intermediate_size", 0) or 0)
    if shared:
        raise ConfigError(
            f"model config shared_expert_intermediate_size: expected 0 (Qwen3-MoE has no "
            f"shared experts), got {shared}. Fix: serve this (Qwen2-MoE style) model with "
            "vLLM's native class; its sigmoid-gated shared expert is not mapped here."
        )
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"model config hidden_act: expected 'silu', got {act!r}. Fix: use a SwiGLU model.")
    return MoEConfig(
        dim=int(hf.hidden_size),
        hidden_dim=int(hf.moe_intermediate_size),
        num_experts=int(hf.num_experts),
        top_k=int(hf.num_experts_per_tok),
        score_func="softmax",
        route_norm=bool(getattr(hf, "norm_topk_prob", True)),
        param_dtype=dtype,
        padding=PADDING,
    )


def is_moe_layer(hf: Any, layer_idx: int) -> bool:
    only_dense = list(getattr(hf, "mlp_only_layers", None) or [])
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    return layer_idx not in only_dense and int(hf.num_experts) > 0 and (layer_idx + 1) % step == 0


class _Attention(nn.Module):
    def __init__(self, hf: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = int(hf.num_attention_heads), int(hf.num_key_value_heads)
        if heads % tp != 0 or (kv_heads % tp != 0 and tp % kv_heads != 0):
            raise ConfigError(
                f"{prefix}: num_attention_heads={heads}, num_key_value_heads={kv_heads}: "
                f"expected both to shard over tensor_parallel_size={tp}. Fix: choose a TP size "
                "that divides the query heads and divides or is a multiple of the KV heads."
            )
        self.head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)
        self.q_size = heads // tp * self.head_dim
        self.kv_size = max(1, kv_heads // tp) * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            hf.hidden_size, self.head_dim, heads, kv_heads,
            bias=bool(getattr(hf, "attention_bias", False)), prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(heads * self.head_dim, hf.hidden_size, bias=False, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=int(getattr(hf, "max_position_embeddings", 8192)),
            rope_parameters=hf.rope_parameters,
        )
        self.attn = Attention(
            heads // tp, self.head_dim, self.head_dim**-0.5,
            num_kv_heads=max(1, kv_heads // tp),
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
        )
        self.q_norm = RMSNorm(self.head_dim, eps=hf.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=hf.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x_TD)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Per-head RMSNorm of q and k (Qwen3), then RoPE.
        q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out  # type: ignore[no-any-return]


class _DenseMLP(nn.Module):
    """SwiGLU MLP of the mlp_only_layers, TP-sharded by vLLM's linear layers."""

    def __init__(self, hf: Any, prefix: str) -> None:
        super().__init__()
        f = int(hf.intermediate_size)
        self.gate_up_proj = MergedColumnParallelLinear(hf.hidden_size, [f, f], bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(f, hf.hidden_size, bias=False, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h, _ = self.gate_up_proj(x_TD)
        out, _ = self.down_proj(self.act(h))
        return out  # type: ignore[no-any-return]


class _DecoderLayer(nn.Module):
    def __init__(self, hf: Any, vllm_config: VllmConfig, idx: int, prefix: str, pctx: ParallelContext[EP], device: torch.device) -> None:
        super().__init__()
        self.self_attn = _Attention(hf, vllm_config, f"{prefix}.self_attn")
        self.pctx = pctx
        self.mlp: MoE[Replicated] | _DenseMLP
        if is_moe_layer(hf, idx):
            cfg = moe_config_from_hf(hf, vllm_config.model_config.dtype)
            # Built on the meta device (no memory), then materialized and initialized:
            # to_empty() + init_states(); load_weights overwrites every value.
            moe = MoE(cfg, pctx, layout="replicated", device="meta", name=f"{prefix}.mlp")
            moe.to_empty(device=device)
            moe.init_states(seed=INIT_SEED)
            self.mlp = moe
        else:
            self.mlp = _DenseMLP(hf, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hf.hidden_size, eps=hf.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf.hidden_size, eps=hf.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x_TD: torch.Tensor, residual_TD: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual_TD is None:
            residual_TD = x_TD
            x_TD = self.input_layernorm(x_TD)
        else:
            x_TD, residual_TD = self.input_layernorm(x_TD, residual_TD)
        x_TD = self.self_attn(positions, x_TD)
        x_TD, residual_TD = self.post_attention_layernorm(x_TD, residual_TD)
        if isinstance(self.mlp, MoE):
            # vLLM hands every TP rank the same hidden states (o_proj's all-reduce, then
            # a replicated norm): Replicate on the TP(=EP) axis, verified in debug mode.
            return self.mlp(as_rep(x_TD, self.pctx, f"{self.mlp.name}: x_TD (from vLLM)")), residual_TD
        return self.mlp(x_TD), residual_TD


class _Qwen3MoeModel(nn.Module):
    def __init__(self, hf: Any, vllm_config: VllmConfig, prefix: str, pctx: ParallelContext[EP], device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf.vocab_size, hf.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            _DecoderLayer(hf, vllm_config, i, f"{prefix}.layers.{i}", pctx, device)
            for i in range(int(hf.num_hidden_layers))
        )
        self.norm = RMSNorm(hf.hidden_size, eps=hf.rms_norm_eps)


class SpmdQwen3MoeForCausalLM(nn.Module):
    """Qwen3-MoE for vLLM with spmd_moe MoE layers (EP = TP over vLLM's TP group)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_text_config
        pc = vllm_config.parallel_config
        if get_pp_group().world_size > 1:
            raise ConfigError(
                f"pipeline_parallel_size: expected 1 for {type(self).__name__}, got "
                f"{get_pp_group().world_size}. Fix: use tensor_parallel_size (EP = TP) instead."
            )
        if getattr(pc, "enable_expert_parallel", False):
            raise ConfigError(
                "enable_expert_parallel: expected False, got True. spmd_moe layers already "
                "shard the experts over the TP group (EP = TP); vLLM's flag only drives its "
                "own fused-MoE kernels. Fix: drop enable_expert_parallel and set "
                "tensor_parallel_size to the EP size you want."
            )
        if vllm_config.quant_config is not None:
            raise ConfigError(
                f"quantization: expected none for {type(self).__name__}, got "
                f"{type(vllm_config.quant_config).__name__}. Fix: serve an unquantized "
                "(fp32/bf16/fp16) checkpoint; spmd_moe experts run plain grouped GEMMs."
            )
        self.config = hf
        # EP = TP on vLLM's TP group; the bytes ride vLLM's own communicator (VllmComm).
        self.pctx = vllm_tp_context(get_tp_group())
        device = torch.device(vllm_config.device_config.device)
        mp = f"{prefix}.model" if prefix else "model"
        self.model = _Qwen3MoeModel(hf, vllm_config, mp, self.pctx, device)
        self.tie_word_embeddings = bool(getattr(hf, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf.vocab_size, hf.hidden_size, prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if self.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(hf.vocab_size)
        # How many forward calls saw each token count T (tests, debugging): proves that
        # odd T and T=1 reached the MoE layers. Bounded by max_num_batched_tokens.
        self.token_counts: dict[int, int] = {}

    # ------------------------------------------------------------------ vLLM interface
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.embed_tokens(input_ids)
        return out

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[T] token ids (or [T, D] embeddings) and [T] positions -> [T, D] hidden states."""
        if inputs_embeds is not None:
            x_TD = inputs_embeds
        elif input_ids is not None:
            x_TD = self.embed_input_ids(input_ids)
        else:
            raise ConfigError("forward: expected input_ids or inputs_embeds, got neither. Fix: pass one.")
        T = int(x_TD.shape[0])
        self.token_counts[T] = self.token_counts.get(T, 0) + 1
        residual_TD: torch.Tensor | None = None
        for layer in self.model.layers:
            x_TD, residual_TD = layer(positions, x_TD, residual_TD)
        out, _ = self.model.norm(x_TD, residual_TD)
        return out  # type: ignore[no-any-return]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        out: torch.Tensor | None = self.logits_processor(self.lm_head, hidden_states)
        return out

    # ------------------------------------------------------------------ weights
    def moe_layers(self) -> dict[str, MoE[Any]]:
        """'model.layers.{i}.mlp' -> its MoE."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MoE)}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF Qwen3-MoE weights; return the parameter names loaded (all of them).

        Routed experts: this rank copies only its own experts [e0, e1), from per-expert
        or fused names. Raises CheckpointError on a missing, unexpected, duplicated or
        mis-shaped weight.
        """
        params = dict(self.named_parameters())
        moes = self.moe_layers()
        ledger = W.ExpertLedger()
        shards: dict[str, set[Any]] = {}
        loaded: set[str] = set()
        for name, w in weights:
            if name.endswith("rotary_emb.inv_freq") or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            if W.is_expert_weight(name):
                self._load_experts(name, w, moes, params, ledger)
                continue
            rp = W.router_param(name)
            if rp is not None and rp in params:
                self._copy(params[rp], w, name)
                loaded.add(rp)
                continue
            for ck, ours, shard in _STACKED:
                if ck in name:
                    target = name.replace(ck, ours)
                    if target not in params:
                        break
                    p = params[target]
                    getattr(p, "weight_loader")(p, w, shard)
                    seen = shards.setdefault(target, set())
                    if shard in seen:
                        raise CheckpointError(f"checkpoint weight '{name}': expected once, got it twice. Fix: remove the duplicate.")
                    seen.add(shard)
                    break
            else:
                if name not in params:
                    raise CheckpointError(
                        f"checkpoint weight '{name}': unexpected for {type(self).__name__} (no such "
                        "parameter). Fix: check that the checkpoint is a Qwen3-MoE one and that its "
                        "config (num_hidden_layers, mlp_only_layers, tie_word_embeddings) matches."
                    )
                p = params[name]
                getattr(p, "weight_loader", default_weight_loader)(p, w)
                loaded.add(name)
                continue
            if name.replace(ck, ours) not in params:
                raise CheckpointError(
                    f"checkpoint weight '{name}': unexpected (no parameter '{name.replace(ck, ours)}'). "
                    "Fix: check mlp_only_layers / decoder_sparse_step of the config against the checkpoint."
                )
        for target, seen in shards.items():
            need = next(v for k, v in _SHARDS_OF.items() if k in target)
            if seen != need:
                raise CheckpointError(
                    f"parameter '{target}': expected the checkpoint shards {sorted(str(x) for x in need)}, "
                    f"got {sorted(str(x) for x in seen)}. Fix: the checkpoint lacks part of this layer."
                )
            loaded.add(target)
        expert_params: dict[str, tuple[int, int]] = {}
        for mname, moe in moes.items():
            e0, e1 = moe.experts.expert_start, moe.experts.expert_stop
            for suffix in (W.W1, W.W2, W.W3):
                expert_params[f"{mname}.{suffix}"] = (e0, e1)
        loaded |= ledger.complete(expert_params)
        missing = sorted(set(params) - loaded)
        if missing:
            raise CheckpointError(
                f"parameters {missing[:6]}{' ...' if len(missing) > 6 else ''}: expected in the "
                "checkpoint, got no weight for them. Fix: check that the checkpoint matches the config."
            )
        return loaded

    def _load_experts(
        self, name: str, w: torch.Tensor, moes: dict[str, MoE[Any]], params: dict[str, nn.Parameter], ledger: W.ExpertLedger
    ) -> None:
        mlp = W.moe_prefix_of(name)
        moe = moes.get(mlp or "")
        if moe is None:
            raise CheckpointError(
                f"checkpoint weight '{name}': expert weights for '{mlp}', which is not an MoE "
                f"layer of this model (MoE layers: {sorted(moes)[:4]}...). Fix: check "
                "mlp_only_layers / decoder_sparse_step / num_hidden_layers of the config."
            )
        cfg = moe.cfg
        copies = W.expert_copies(
            name, w, num_experts=cfg.num_experts, hidden_dim=cfg.hidden_dim, dim=cfg.dim,
            e0=moe.experts.expert_start, e1=moe.experts.expert_stop,
        )
        for c in copies:
            p = params[c.param]
            p.data[c.local_start : c.local_start + c.src.shape[0]].copy_(c.src)
            ledger.add(c, name)

    @staticmethod
    def _copy(p: nn.Parameter, w: torch.Tensor, name: str) -> None:
        if tuple(p.shape) != tuple(w.shape):
            raise CheckpointError(
                f"checkpoint weight '{name}': expected shape {tuple(p.shape)}, got {tuple(w.shape)}. "
                "Fix: check hidden_size / num_experts of the config against the checkpoint."
            )
        p.data.copy_(w)

    # ------------------------------------------------------------------ introspection
    @torch.no_grad()
    def spmd_report(self) -> dict[str, Any]:
        """What this rank holds: for tests, the demo and debugging (apply_model)."""
        layers: dict[str, Any] = {}
        for name, moe in self.moe_layers().items():
            ex = moe.experts
            layers[name] = {
                "experts": [ex.expert_start, ex.expert_stop],
                "w1_shape": list(ex.w1_EFD.shape),
                "sums": {k: float(getattr(ex, k).double().sum()) for k in ("w1_EFD", "w2_EDF", "w3_EFD")},
                "router_sum": float(moe.router.gate.weight.double().sum()),
                "tokens_routed": float(moe.tokens_per_expert_E.sum()),
                "buffers_finite": all(bool(torch.isfinite(b).all()) for b in moe.buffers()),
            }
        rope_err = 0.0
        for layer in self.model.layers:
            attn: Any = getattr(layer, "self_attn")
            rope_err = max(rope_err, _rope_cache_error(attn.rotary_emb, self.config))
        g = self.pctx.group
        return {
            "rank": self.pctx.rank,
            "size": self.pctx.size,
            "group_backend": None if g is None else str(torch.distributed.get_backend(g)),
            "is_vllm_tp_group": g is get_tp_group().device_group,
            "debug": _debug.is_debug(),
            "layers": layers,
            "rope_cache_max_err": rope_err,
            "token_counts": {str(k): v for k, v in sorted(self.token_counts.items())},
        }


def _rope_cache_error(rope: Any, hf: Any) -> float:
    """Max |cos_sin_cache - cos/sin recomputed here| (default RoPE), a buffer that must
    survive the model's construction and loading untouched."""
    cache = getattr(rope, "cos_sin_cache", None)
    params = getattr(hf, "rope_parameters", None) or {}
    if cache is None or params.get("rope_type", "default") != "default":
        return 0.0
    rot = cache.shape[-1]
    theta = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.outer(torch.arange(cache.shape[0], dtype=torch.float64), inv_freq)
    want = torch.cat([ang.cos(), ang.sin()], dim=-1)
    if math.prod(want.shape) != cache.numel():
        return float("inf")
    return float((cache.double().reshape(want.shape) - want).abs().max())
