"""Spmd*ForCausalLM: vLLM's own MoE model classes with ``spmd_moe.MoE`` as the sparse block.

For each family in :mod:`spmd_moe.integrations.vllm.families` (Qwen3-MoE, Qwen2-MoE,
Mixtral) the plugin's class subclasses vLLM's native ``*ForCausalLM`` and builds it with
two names of vLLM's model module swapped for the duration of ``__init__``:

* the sparse-MoE block class (``Qwen3MoeSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
  ``MixtralMoE``) -> :class:`SpmdMoEBlock`, an ``spmd_moe.MoE(layout='replicated')`` on
  vLLM's TP group. vLLM's fused-MoE layer (and its expert weights) is never built;
* the torch.compile-decorated base model -> an eager subclass (``ignore_torch_compile``):
  the MoE layer's collectives and the prefill dispatcher's host sync are not traced.

Everything else (embedding, attention with its KV cache, RoPE, norms, dense MLPs, LM head,
logits) is vLLM's own code, tensor-parallel as in the native model. Each MoE layer takes
the hidden states replicated over the TP ranks (EP = TP: rank r holds experts
[r*E/n, (r+1)*E/n)). On CPU outside debug mode every rank routes every token, vLLM's own
CPU fused-experts op computes this rank's experts' weighted slots (a Partial summand) and
one all-reduce through vLLM's communicator makes the output replicated
(spmd_moe.integrations.vllm.experts). Otherwise (debug mode, SPMD_MOE_VLLM_EXPERTS=spmd,
CUDA, autograd, routing replay) spmd_moe's own path runs: the one-all-reduce path
(spmd_moe.replicated_decode) or, in debug mode, the checked split path. Qwen2-MoE's shared
expert is the layer's shared experts (hidden dim split over TP) scaled by its sigmoid
gate. No vLLM fused-MoE *layer* (module, weights) is built.

Shape suffixes: T tokens (flattened over sequences), D hidden size.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import threading
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tp_group
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models import mixtral as _mixtral
from vllm.model_executor.models import qwen2_moe as _qwen2_moe
from vllm.model_executor.models import qwen3_moe as _qwen3_moe

from spmd_moe import _debug
from spmd_moe.config import MoEConfig
from spmd_moe.errors import CheckpointError
from spmd_moe.integrations.vllm import experts as _fx
from spmd_moe.integrations.vllm import weights as W
from spmd_moe.integrations.vllm.checks import refuse_engine_args
from spmd_moe.integrations.vllm.comm import vllm_tp_context
from spmd_moe.integrations.vllm.families import MIXTRAL, PADDING, QWEN2_MOE, QWEN3_MOE, Family, family_of
from spmd_moe.moe import MoE, Replicated
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, as_rep

__all__ = [
    "PADDING", "SpmdMixtralForCausalLM", "SpmdMoEBlock", "SpmdQwen2MoeForCausalLM", "SpmdQwen3MoeForCausalLM",
    "is_moe_layer", "moe_config_from_hf", "tp_parallel_context",
]

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


def tp_parallel_context() -> ParallelContext[EP]:
    """The expert axis of every MoE layer: vLLM's TP group (EP = TP); the bytes ride
    vLLM's own communicator (VllmComm, spmd_moe.integrations.vllm.comm)."""
    return vllm_tp_context(get_tp_group())


class SpmdMoEBlock(MoE[Replicated]):
    """The sparse-MoE block vLLM's decoder layer builds while an Spmd* model is built.

    Accepts whatever arguments the family's native block takes (they differ per family)
    and reads its configuration from the current VllmConfig instead. Built on the meta
    device (no memory), then materialized and initialized (to_empty + init_states);
    load_weights overwrites every value."""

    def __init__(self, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        vc = get_current_vllm_config()
        hf = vc.model_config.hf_text_config
        cfg = family_of(hf).moe_config(hf, vc.model_config.dtype)
        super().__init__(cfg, tp_parallel_context(), layout="replicated", device="meta", name=prefix)
        self.to_empty(device=torch.device(vc.device_config.device))
        self.init_states(seed=INIT_SEED)
        # What vLLM's *ForCausalLM.__init__ reads from its MoE blocks (expert bookkeeping
        # for EPLB, which spmd_moe refuses): E logical = physical experts, no redundancy.
        E = cfg.num_experts
        self.n_routed_experts = self.n_logical_experts = self.n_physical_experts = E
        self.n_redundant_experts = 0
        self.n_local_physical_experts = E // self.pctx.size
        # vLLM's CPU fused-experts op for this rank's experts (spmd_moe.integrations.vllm.
        # experts): packed after load_weights, when the op can take the layer.
        self.cpu_fused: _fx.CpuFusedExperts | None = None

    def pack_experts(self) -> str | None:
        """(Re)pack this rank's experts for vLLM's CPU op; the reason when it cannot be used."""
        self.cpu_fused = None
        why = "SPMD_MOE_VLLM_EXPERTS=spmd" if _fx.choice() == "spmd" else _fx.unusable_reason(self)
        if why is None:
            self.cpu_fused = _fx.CpuFusedExperts(self.experts)
        return why

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[T, D] (or [D]) hidden states, the same on every TP rank -> the same shape."""
        if hidden_states.dim() != 2:
            return self.forward(hidden_states.reshape(-1, hidden_states.shape[-1])).reshape(hidden_states.shape)
        if self.pctx.size > 1 and _debug._enabled:
            # As MoE.forward does: ranks that disagree on T fail on the header, before the
            # stated placement below is verified from the values (a checksum exchange).
            self.tokens.check_entry(hidden_states.shape[0])
        # vLLM hands every TP rank the same hidden states (o_proj's all-reduce, then a
        # replicated norm): Replicate on the TP(=EP) axis, verified in debug mode.
        x_TD = as_rep(hidden_states, self.pctx, f"{self.name}: x_TD (from vLLM)")
        if _fx.applies(self, x_TD):  # CPU inference: vLLM's fused-experts op
            self._check_input(x_TD)
            return _fx.forward(self, x_TD.contiguous())
        y_TD: torch.Tensor = MoE.forward(self, x_TD)
        return y_TD


_SWAP_LOCK = threading.RLock()
_EAGER: dict[type, type] = {}


def _eager(base: type) -> type:
    """An uncompiled subclass of a @support_torch_compile model class (cached)."""
    cls = _EAGER.get(base)
    if cls is None:
        cls = ignore_torch_compile(type(f"Eager{base.__name__}", (base,), {"__module__": __name__}))
        _EAGER[base] = cls
    return cls


@contextlib.contextmanager
def _swapped(fam: Family) -> Iterator[None]:
    """Within the block: vLLM's model module builds SpmdMoEBlock for its sparse block and
    an eager base model. The module's names are restored on exit (vLLM's native class
    stays intact for other models in the same process)."""
    mod = importlib.import_module(fam.vllm_module)
    with _SWAP_LOCK:
        saved = {n: getattr(mod, n) for n in (fam.block_class, fam.model_class)}
        setattr(mod, fam.block_class, SpmdMoEBlock)
        setattr(mod, fam.model_class, _eager(saved[fam.model_class]))
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(mod, n, v)


def moe_config_from_hf(hf: Any, dtype: torch.dtype) -> MoEConfig:
    """The MoEConfig of one sparse block of the HF config's family."""
    return family_of(hf).moe_config(hf, dtype)


def is_moe_layer(hf: Any, layer_idx: int) -> bool:
    return family_of(hf).is_moe_layer(hf, layer_idx)


class _SpmdCausalLM(nn.Module):
    """Mixed in before a vLLM *ForCausalLM: build with the swapped block, count token
    counts, load HF checkpoints into the spmd_moe layers, report what each rank holds."""

    family: ClassVar[Family]
    config: Any

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_engine_args(vllm_config, self.family.spmd_arch)
        kw: dict[str, Any] = {"vllm_config": vllm_config, "prefix": prefix}
        with _swapped(self.family):
            super().__init__(**kw)
        # vLLM's MixtureOfExperts bookkeeping keeps a list 'moe_layers' for EPLB only
        # (refused above); it would shadow this class's moe_layers() method.
        self.__dict__.pop("moe_layers", None)
        hf = vllm_config.model_config.hf_text_config
        self.tie_word_embeddings = bool(getattr(hf, "tie_word_embeddings", False))
        moes = self.moe_layers()
        self.pctx: ParallelContext[EP] = next(iter(moes.values())).pctx if moes else tp_parallel_context()
        # How many forward calls saw each token count T (tests, debugging): proves that
        # odd T and T=1 reached the MoE layers. Bounded by max_num_batched_tokens.
        self.token_counts: dict[int, int] = {}

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Any:
        """[T] token ids (or [T, D] embeddings) and [T] positions -> [T, D] hidden states."""
        x = inputs_embeds if inputs_embeds is not None else input_ids
        if x is not None:
            T = int(x.shape[0])
            self.token_counts[T] = self.token_counts.get(T, 0) + 1
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    # ------------------------------------------------------------------ weights
    def moe_layers(self) -> dict[str, MoE[Any]]:
        """'model.layers.{i}.mlp' (Mixtral: '...block_sparse_moe') -> its MoE."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MoE)}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load an HF checkpoint of the family; return the parameter names loaded (all).

        Routed experts: this rank copies only its own experts [e0, e1), from per-expert
        or fused names; the shared expert its slice of the hidden dim. Raises
        CheckpointError on a missing, unexpected, duplicated or mis-shaped weight, naming
        the checkpoint tensor; expert coverage is checked over all experts on every rank,
        so every rank raises the same error.
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
            if W.is_shared_weight(name):
                loaded.add(self._load_shared(name, w, moes, params))
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
                        f"parameter). Fix: check that the checkpoint is a {self.family.model_type} one and "
                        "that its config (num_hidden_layers, mlp_only_layers, tie_word_embeddings) matches."
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
        # Every expert of every layer, on every rank (the same error everywhere), then
        # this rank's slots.
        ledger.check_all_experts({n: m.cfg.num_experts for n, m in moes.items()}, self.family.expert_name)
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
        for moe in moes.values():  # every weight is in: pack the experts for vLLM's CPU op
            if isinstance(moe, SpmdMoEBlock):
                moe.pack_experts()
        return loaded

    def _moe_of(self, name: str, moes: dict[str, MoE[Any]]) -> MoE[Any]:
        block = W.moe_prefix_of(name)
        moe = moes.get(block or "")
        if moe is None:
            raise CheckpointError(
                f"checkpoint weight '{name}': expert weights for '{block}', which is not an MoE "
                f"layer of this model (MoE layers: {sorted(moes)[:4]}...). Fix: check "
                "mlp_only_layers / decoder_sparse_step / num_hidden_layers of the config."
            )
        return moe

    def _load_experts(
        self, name: str, w: torch.Tensor, moes: dict[str, MoE[Any]], params: dict[str, nn.Parameter], ledger: W.ExpertLedger
    ) -> None:
        moe = self._moe_of(name, moes)
        cfg = moe.cfg
        copies = W.expert_copies(
            name, w, num_experts=cfg.num_experts, hidden_dim=cfg.hidden_dim, dim=cfg.dim,
            e0=moe.experts.expert_start, e1=moe.experts.expert_stop,
        )
        ledger.note(name, cfg.num_experts)
        for c in copies:
            p = params[c.param]
            p.data[c.local_start : c.local_start + c.src.shape[0]].copy_(c.src)
            ledger.add(c, name)

    def _load_shared(self, name: str, w: torch.Tensor, moes: dict[str, MoE[Any]], params: dict[str, nn.Parameter]) -> str:
        moe = self._moe_of(name, moes)
        S = moe.cfg.shared_hidden_dim
        if S is None:
            raise CheckpointError(
                f"checkpoint weight '{name}': unexpected, the config has no shared expert "
                "(shared_expert_intermediate_size=0). Fix: set it in the config or drop the tensor."
            )
        pname, src = W.shared_copy(name, w, shared_hidden=S, dim=moe.cfg.dim, size=moe.pctx.size, rank=moe.pctx.rank)
        self._copy(params[pname], src, name)
        return pname

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
                "shared_sums": (
                    None if moe.shared_experts is None
                    else {k: float(p.double().sum()) for k, p in moe.shared_experts.named_parameters()}
                ),
                "tokens_routed": float(moe.tokens_per_expert_E.sum()),
                # Who computes this rank's experts outside debug mode: vLLM's CPU op or spmd_moe.
                "expert_compute": "vllm.cpu_fused_moe" if getattr(moe, "cpu_fused", None) is not None else "spmd_moe",
                "buffers_finite": all(bool(torch.isfinite(b).all()) for b in moe.buffers()),
            }
        rope_err = 0.0
        model: Any = getattr(self, "model")
        for layer in model.layers:
            attn: Any = getattr(layer, "self_attn")
            rope_err = max(rope_err, _rope_cache_error(attn.rotary_emb, self.config))
        g = self.pctx.group
        return {
            "rank": self.pctx.rank,
            "size": self.pctx.size,
            "arch": type(self).__name__,
            # What was built: vLLM's native class underneath, its eager base model, and
            # no vLLM fused-MoE module (so no native expert weights were allocated).
            "mro": [c.__name__ for c in type(self).__mro__],
            "base_model_class": type(model).__name__,
            "native_moe_modules": sorted(
                {type(m).__name__ for m in self.modules() if "FusedMoE" in type(m).__name__ or type(m).__name__ == self.family.block_class}
            ),
            # FusedMoE's parameter names (w13_weight / w2_weight): none may exist.
            "fused_moe_params": [n for n, _ in self.named_parameters() if n.endswith(("w13_weight", "experts.w2_weight"))],
            "moe_param_numel": sum(p.numel() for m in self.moe_layers().values() for p in m.parameters()),
            "group_backend": None if g is None else str(torch.distributed.get_backend(g)),
            "is_vllm_tp_group": g is get_tp_group().device_group,
            "debug": _debug.is_debug(),
            "layers": layers,
            "rope_cache_max_err": rope_err,
            "token_counts": {str(k): v for k, v in sorted(self.token_counts.items())},
        }


class SpmdQwen3MoeForCausalLM(_SpmdCausalLM, _qwen3_moe.Qwen3MoeForCausalLM):  # type: ignore[misc]
    """vLLM's Qwen3MoeForCausalLM with spmd_moe MoE layers (EP = TP over vLLM's TP group)."""

    family = QWEN3_MOE


class SpmdQwen2MoeForCausalLM(_SpmdCausalLM, _qwen2_moe.Qwen2MoeForCausalLM):  # type: ignore[misc]
    """vLLM's Qwen2MoeForCausalLM with spmd_moe MoE layers: routed experts EP = TP, the
    shared expert's hidden dim split over TP, scaled per token by its sigmoid gate."""

    family = QWEN2_MOE


class SpmdMixtralForCausalLM(_SpmdCausalLM, _mixtral.MixtralForCausalLM):  # type: ignore[misc]
    """vLLM's MixtralForCausalLM with spmd_moe MoE layers (EP = TP over vLLM's TP group)."""

    family = MIXTRAL


MODEL_CLASSES: dict[str, type[_SpmdCausalLM]] = {
    c.family.spmd_arch: c for c in (SpmdQwen3MoeForCausalLM, SpmdQwen2MoeForCausalLM, SpmdMixtralForCausalLM)
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
