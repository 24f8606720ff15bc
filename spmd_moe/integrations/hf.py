"""HF transformers drop-in: swap the MoE blocks of a loaded model for ``spmd_moe.MoE``.

``swap_moe_blocks(model, pctx, layout=..., padding=...)`` walks a loaded transformers
(>= 5) model and replaces every MoE block of a supported family by a
:class:`SwappedMoEBlock` holding a ``spmd_moe.MoE`` with the same weights:

==========================  ====================================================
HF block                    spmd_moe MoEConfig
==========================  ====================================================
``Qwen3MoeSparseMoeBlock``  softmax, route_norm = norm_topk_prob
``MixtralSparseMoeBlock``   softmax, route_norm = True (Mixtral always normalizes)
``DeepseekV3MoE``           sigmoid, route_norm = norm_topk_prob,
                            route_scale = routed_scaling_factor, group-limited
                            routing (num_expert_groups = n_group,
                            num_limited_groups = topk_group), the
                            e_score_correction_bias as the selection-only
                            expert bias, shared experts (hidden dim
                            moe_intermediate_size * n_shared_experts)
==========================  ====================================================

Weight map (transformers 5 stores the routed experts fused):
    gate.weight                         -> router.gate.weight          [E, D]
    experts.gate_up_proj[e] = [w1; w3]  -> w1_EFD[e], w3_EFD[e]         gate rows first
    experts.down_proj[e]                -> w2_EDF[e]                    [D, F]
    gate.e_score_correction_bias        -> expert_bias_E (DeepSeek-V3)
    shared_experts.{gate,up,down}_proj  -> shared_experts.{w1,w3,w2}    (DeepSeek-V3)

On a process group (``ParallelContext.from_group(group, "tp")``: TP2EP, the experts
sharded E/n over the group, the shared experts' hidden dim split n ways) each rank
builds the full state dict of the block it already holds and loads its slice
(``spmd_moe.checkpoint.shard_state_dict``); the HF block is dropped, so the other
ranks' experts are freed.

The call convention is HF's: ``block(hidden_states [B, L, D]) -> [B, L, D]`` (all three
families return one tensor in transformers 5). HF records the router logits
(``output_router_logits=True``, Mixtral's and Qwen3-MoE's load-balancing aux loss) with
forward hooks on its router class: the swapped block holds a parameter-free
``router_logits`` tap of that class, run only while HF is recording them, which returns
HF's logits ``x @ gate.weight.T`` computed from the spmd_moe router's weight. The hidden states arrive from transformers as plain tensors; the block
states their placement on the expert axis at the boundary, as ``layout`` says
(verified in debug mode):

* ``'invariant'`` (the default): every rank runs the same replicated HF model on the
  same tokens and gets the complete input gradient (Megatron-style TP). Only the router
  gate's gradient is Partial (each rank routed its own chunk of the tokens): sum it
  over the group (:func:`all_reduce_router_grads`).
* ``'replicated'``: the same tokens on every rank, the input gradient Partial
  (spmd_types' convention: sum the replicated parameters' gradients over the group).
* ``'sequence'``: each rank feeds its own tokens (expert parallelism over data-parallel
  ranks); output and input gradient are this rank's.

Padding is explicit (``padding``: 'pad' or 'error'; None = not told, and a layer that
would need to pad raises PaddingError offering both choices). On one device nothing
is ever padded.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from spmd_moe.checkpoint import shard_state_dict
from spmd_moe.config import MoEConfig, PaddingPolicy
from spmd_moe.errors import CheckpointError, ConfigError
from spmd_moe.moe import Invariant, MoE, Replicated, Sequence
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, as_inv, as_rep, as_var

__all__ = [
    "FAMILIES", "Family", "SwappedMoEBlock", "all_reduce_router_grads", "block_family",
    "hf_block_state_dict", "moe_config_from_hf_block", "swap_block", "swap_moe_blocks",
]

Family = Literal["qwen3_moe", "mixtral", "deepseek_v3"]
HFLayout = Literal["replicated", "invariant", "sequence"]

# family -> (transformers module, block class name)
FAMILIES: dict[Family, tuple[str, str]] = {
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
}

_W1, _W2, _W3 = (
    "routed_experts.inner_experts.w1_EFD", "routed_experts.inner_experts.w2_EDF", "routed_experts.inner_experts.w3_EFD",
)
# DeepSeek-V3's e_score_correction_bias becomes spmd_moe's expert bias, which exists
# only when MoEConfig.load_balance_coeff is set. It changes selection only (as in HF);
# it moves only if the user calls MoE.update_expert_bias() (aux-loss-free balancing,
# DeepSeek-V3's bias update speed 1e-3).
DEEPSEEK_BIAS_COEFF = 1e-3


def _block_classes() -> dict[Family, type[nn.Module]]:
    """The block class of each family whose transformers module imports here."""
    import importlib

    out: dict[Family, type[nn.Module]] = {}
    for fam, (mod, cls) in FAMILIES.items():
        try:
            out[fam] = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            continue
    return out


def block_family(block: nn.Module) -> Family | None:
    """The supported family of an HF MoE block, or None if it is not one."""
    for fam, cls in _block_classes().items():
        if isinstance(block, cls):
            return fam
    return None


def _param(block: nn.Module, path: str) -> torch.Tensor:
    t: Any = block
    for part in path.split("."):
        t = getattr(t, part, None)
        if t is None:
            raise CheckpointError(
                f"HF MoE block {type(block).__name__}: expected attribute '{path}', got none. "
                "Fix: use transformers >= 5 (fused experts: experts.gate_up_proj [E, 2F, D], "
                "experts.down_proj [E, D, F]); older per-expert layouts are not supported."
            )
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(
            f"HF MoE block {type(block).__name__}: expected '{path}' to be a tensor, got "
            f"{type(t).__name__}. Fix: use transformers >= 5 (fused experts)."
        )
    return t


def _check_silu(block: nn.Module, where: str, act: Any) -> None:
    name = type(act).__name__.lower()
    if "silu" not in name and "swish" not in name:
        raise ConfigError(
            f"HF MoE block {type(block).__name__}: {where} activation: expected SiLU "
            f"(hidden_act='silu'; spmd_moe's experts are SwiGLU), got {type(act).__name__}. "
            "Fix: only silu-gated models can be swapped."
        )


def moe_config_from_hf_block(
    block: nn.Module,
    *,
    padding: PaddingPolicy | None = None,
    dispatcher: Literal["auto", "all_to_all", "all_gather"] = "auto",
) -> MoEConfig:
    """The MoEConfig that computes what ``block`` computes (read from the block itself:
    its router and weight shapes)."""
    fam = block_family(block)
    if fam is None:
        raise ConfigError(
            f"HF MoE block: expected one of {[c for _, c in FAMILIES.values()]}, got "
            f"{type(block).__name__}. Fix: swap only supported families (see docs/hf.md)."
        )
    gate_w = _param(block, "gate.weight")
    gate_up = _param(block, "experts.gate_up_proj")
    E, D = gate_w.shape
    if gate_up.ndim != 3 or gate_up.shape[0] != E or gate_up.shape[2] != D or gate_up.shape[1] % 2:
        raise CheckpointError(
            f"HF MoE block {type(block).__name__}: experts.gate_up_proj: expected shape "
            f"[E={E}, 2F, D={D}], got {tuple(gate_up.shape)}. Fix: check the model config."
        )
    F_hid = gate_up.shape[1] // 2
    _check_silu(block, "experts", getattr(block.experts, "act_fn", None))
    router: Any = getattr(block, "gate")
    top_k = int(getattr(router, "top_k"))
    common: dict[str, Any] = dict(
        dim=int(D), hidden_dim=int(F_hid), num_experts=int(E), top_k=top_k,
        param_dtype=gate_up.dtype, padding=padding, dispatcher=dispatcher,
    )
    if fam == "qwen3_moe":
        return MoEConfig(score_func="softmax", route_norm=bool(router.norm_topk_prob), **common)
    if fam == "mixtral":
        return MoEConfig(score_func="softmax", route_norm=True, **common)
    # DeepSeek-V3
    shared = getattr(block, "shared_experts", None)
    if shared is None:
        raise ConfigError("HF DeepseekV3MoE: expected shared_experts, got none. Fix: check the model.")
    _check_silu(block, "shared experts", getattr(shared, "act_fn", None))
    n_group, topk_group = int(router.num_group), int(router.topk_group)
    groups: dict[str, Any] = {}
    if n_group > 1:  # one group: HF always keeps it, the same as no group limit
        groups = dict(num_expert_groups=n_group, num_limited_groups=topk_group)
    return MoEConfig(
        score_func="sigmoid", route_norm=bool(router.norm_topk_prob),
        route_scale=float(router.routed_scaling_factor), load_balance_coeff=DEEPSEEK_BIAS_COEFF,
        shared_hidden_dim=int(shared.gate_proj.weight.shape[0]), **groups, **common,
    )


def hf_block_state_dict(block: nn.Module, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The full (EP size 1) spmd_moe state dict of an HF block (detached views)."""
    F_hid = cfg.hidden_dim
    gate_up = _param(block, "experts.gate_up_proj").detach()
    sd: dict[str, torch.Tensor] = {
        "router.gate.weight": _param(block, "gate.weight").detach(),
        _W1: gate_up[:, :F_hid],
        _W3: gate_up[:, F_hid:],
        _W2: _param(block, "experts.down_proj").detach(),
    }
    if cfg.shared_hidden_dim is not None:
        sd["shared_experts.w1.weight"] = _param(block, "shared_experts.gate_proj.weight").detach()
        sd["shared_experts.w3.weight"] = _param(block, "shared_experts.up_proj.weight").detach()
        sd["shared_experts.w2.weight"] = _param(block, "shared_experts.down_proj.weight").detach()
    if cfg.load_balance_coeff is not None:
        sd["expert_bias_E"] = _param(block, "gate.e_score_correction_bias").detach().float()
    return sd


_TAP_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _tap_init(self: nn.Module) -> None:
    nn.Module.__init__(self)  # not the HF router's __init__: no parameters of its own


def _tap_forward(self: nn.Module, x_TD: torch.Tensor, weight_ED: torch.Tensor) -> tuple[torch.Tensor]:
    if getattr(self, "logits_in_fp32"):  # DeepSeek-V3's router computes its logits in fp32
        return (F.linear(x_TD.float(), weight_ED.float()),)
    return (F.linear(x_TD, weight_ED),)


def _logits_tap(router: nn.Module, fp32: bool) -> nn.Module:
    """A parameter-free module that IS an instance of the HF router's class (HF's output
    recorder hooks match by class) and returns (router logits,). Hooks HF already put
    on ``router`` (the model recorded outputs before the swap) move over to it."""
    cls = type(router)
    if cls not in _TAP_CLASSES:
        _TAP_CLASSES[cls] = type(
            f"RouterLogitsTap_{cls.__name__}", (cls,),
            {"__init__": _tap_init, "forward": _tap_forward, "logits_in_fp32": fp32},
        )
    tap = _TAP_CLASSES[cls]()
    for hook in router._forward_hooks.values():
        tap.register_forward_hook(hook)
    return tap


def _recording_router_logits() -> bool:
    """Whether transformers is recording router logits right now (output_router_logits)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    got = _active_collector.get()
    return isinstance(got, dict) and "router_logits" in got


class SwappedMoEBlock(nn.Module):
    """An HF MoE block's replacement: ``[B, L, D] -> [B, L, D]`` through ``self.moe``
    (a ``spmd_moe.MoE`` on ``pctx``'s expert axis, in ``layout``)."""

    def __init__(
        self, moe: MoE[Any], pctx: ParallelContext[EP], layout: HFLayout, family: Family,
        jitter_noise: float = 0.0, router_logits: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.pctx = pctx
        self.layout: HFLayout = layout
        self.family: Family = family
        self.jitter_noise = jitter_noise  # Mixtral's router_jitter_noise (training only)
        self.router_logits = router_logits

    def _tap_router_logits(self, x_TD: torch.Tensor) -> None:
        tap = self.router_logits
        if tap is None or not tap._forward_hooks or not _recording_router_logits():
            return
        if self.pctx.size > 1 and self.layout == "invariant":
            raise ConfigError(
                f"{self.moe.name}: output_router_logits on axis '{self.pctx.name}' (size "
                f"{self.pctx.size}, layout 'invariant'): expected the router gate gradient to be "
                "one kind, got both: the routing part is Partial (each rank routed its own chunk) "
                "and an aux loss on the full logits would add a complete part on every rank. "
                "Fix: use layout 'replicated' (scale the loss by 1/n: every part is then Partial) "
                "or 'sequence', or train without output_router_logits."
            )
        tap(x_TD, self.moe.router.gate.weight)

    def forward(self, hidden_states: Float[torch.Tensor, "*B D"]) -> Float[torch.Tensor, "*B D"]:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:
            if self.pctx.size > 1 and self.layout != "sequence":
                raise ConfigError(
                    f"{self.moe.name}: Mixtral router_jitter_noise={self.jitter_noise} in training "
                    f"on axis '{self.pctx.name}' (size {self.pctx.size}, layout '{self.layout}'): "
                    "expected the same tokens on every rank, got per-rank random jitter. Fix: set "
                    "config.router_jitter_noise=0, or use layout 'sequence'."
                )
            # HF multiplies the hidden states in place; the same factors, out of place.
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        self._tap_router_logits(x_TD)
        return self._run(x_TD).view(shape)

    def _run(self, x_TD: Float[torch.Tensor, "T D"]) -> Float[torch.Tensor, "T D"]:
        """State the tokens' placement on the expert axis (the layout's; verified in
        debug mode) and run the layer, typed per layout."""
        what = f"{self.moe.name}: hidden_states (from transformers)"
        if self.layout == "invariant":
            return cast("MoE[Invariant]", self.moe)(as_inv(x_TD, self.pctx, what))
        if self.layout == "sequence":
            return cast("MoE[Sequence]", self.moe)(as_var(x_TD, self.pctx, what))
        return cast("MoE[Replicated]", self.moe)(as_rep(x_TD, self.pctx, what))


def swap_block(
    block: nn.Module,
    pctx: ParallelContext[EP] | None = None,
    *,
    layout: HFLayout = "invariant",
    padding: PaddingPolicy | None = None,
    dispatcher: Literal["auto", "all_to_all", "all_gather"] = "auto",
    name: str = "moe",
) -> SwappedMoEBlock:
    """A SwappedMoEBlock with ``block``'s weights (this rank's slice on a group)."""
    pctx = pctx or ParallelContext.single()
    cfg = moe_config_from_hf_block(block, padding=padding, dispatcher=dispatcher)  # raises for others
    fam = block_family(block)
    assert fam is not None
    dev = _param(block, "gate.weight").device
    moe = MoE(cfg, pctx, layout=layout, device=dev, name=name)
    full = hf_block_state_dict(block, cfg)
    moe.load_state_dict(shard_state_dict(full, cfg, pctx) if pctx.size > 1 else {k: v.clone() for k, v in full.items()})
    moe.train(block.training)
    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0) if fam == "mixtral" else 0.0
    tap = _logits_tap(getattr(block, "gate"), fp32=fam == "deepseek_v3")
    return SwappedMoEBlock(moe, pctx, layout, fam, jitter, tap)


def swap_moe_blocks(
    model: nn.Module,
    pctx: ParallelContext[EP] | None = None,
    *,
    layout: HFLayout = "invariant",
    padding: PaddingPolicy | None = None,
    dispatcher: Literal["auto", "all_to_all", "all_gather"] = "auto",
) -> dict[str, SwappedMoEBlock]:
    """Replace every supported HF MoE block in ``model`` (in place) by a SwappedMoEBlock
    with the same weights; return {module path: new block}.

    ``pctx``: None for one device, else ``ParallelContext.from_group(group, "tp")`` (every
    rank of the group holds the loaded model; each keeps its experts' slice).
    ``layout``: how the tokens sit on the group (see the module docstring).
    ``padding``: 'pad' lets the layers pad token counts that do not split evenly over
    the group (generation needs it: any B*L), 'error' refuses; None = not told.
    Raises ConfigError if the model holds no supported block.
    """
    pctx = pctx or ParallelContext.single()
    if pctx.size > 1 and not dist.is_initialized():
        raise ConfigError(
            "swap_moe_blocks: expected an initialized torch.distributed for a group of size "
            f"{pctx.size}, got none. Fix: dist.init_process_group(...) first."
        )
    targets = [(path, m) for path, m in model.named_modules() if path and block_family(m) is not None]
    if not targets:
        raise ConfigError(
            f"swap_moe_blocks: expected a model with {[c for _, c in FAMILIES.values()]} "
            f"blocks, got none in {type(model).__name__}. Fix: load a Qwen3-MoE, Mixtral or "
            "DeepSeek-V3 model (transformers >= 5)."
        )
    out: dict[str, SwappedMoEBlock] = {}
    for path, block in targets:
        new = swap_block(block, pctx, layout=layout, padding=padding, dispatcher=dispatcher, name=path)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, new)
        out[path] = new
    return out


def all_reduce_router_grads(model: nn.Module) -> int:
    """Sum the router gate gradients of the swapped blocks over their groups (each rank
    routed only its own chunk of the tokens, so each holds a summand); return how many
    were reduced. Call after backward, before the optimizer step."""
    n = 0
    for m in model.modules():
        if isinstance(m, SwappedMoEBlock) and m.pctx.size > 1:
            g = m.moe.router.gate.weight.grad
            if g is not None:
                dist.all_reduce(g, group=m.pctx.group)
                n += 1
    return n
