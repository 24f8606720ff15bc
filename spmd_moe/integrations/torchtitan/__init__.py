"""torchtitan 0.3.0 adapter: spmd_moe's MoE as a drop-in for torchtitan's MoE module.

One config change swaps the MoE of a torchtitan model spec (Qwen3 ``debugmodel_moe``,
``30B-A3B``, ...)::

    from torchtitan.models.qwen3 import model_registry
    from spmd_moe.integrations.torchtitan import use_spmd_moe

    spec = model_registry("30B-A3B")
    use_spmd_moe(spec)            # every layer's MoE.Config -> SpmdMoE.Config

``SpmdMoE.Config`` subclasses torchtitan's ``MoE.Config`` (same fields: router,
routed_experts, shared_experts, load_balance_coeff, num_experts) plus spmd_moe's
options, so torchtitan's own config code (sharding-config setters, param_init, the
HF state-dict adapter) keeps working on it. The built module:

* takes torchtitan's ``[B, L, D]`` (or ``[T, D]``) and flattens it for spmd_moe;
* has the state-dict keys of torchtitan's MoE (router.gate.weight,
  routed_experts.inner_experts.w1_EFD/w2_EDF/w3_EFD, shared_experts.w1/w2/w3.weight,
  expert_bias_E), so checkpoints move both ways;
* has the attributes torchtitan's optimizer hook (``_update_expert_bias``) reads and
  writes: ``load_balance_coeff``, ``tokens_per_expert_E`` (this rank's counts, which
  the hook sums over TP and the loss mesh), ``expert_bias_E``;
* ``parallelize(parallel_dims)`` takes the EP group from torchtitan's ParallelDims
  (``ParallelContext.from_parallel_dims``), shards the experts E/n per rank (slicing
  materialized weights, or re-creating meta ones) and picks the layout: tokens
  replicated over the EP group (TP without sequence parallel) -> 'invariant' (Inv in,
  Inv out: the complete gradient on every rank, torchtitan's convention, so no
  gradient hooks on the activations); tokens split over it (sequence parallel, or EP
  drawn from data parallel) -> 'sequence'. With TP the EP group must be the TP group
  (TP2EP). The forward states that placement on torchtitan's untyped tokens
  (as_inv / as_var; verified in debug mode).
* pads token counts that do not split over the EP ranks: the adapter's stated policy
  TITAN_PADDING ('pad'), overridable with SpmdMoE.Config.padding='error'.

Experts run in bf16 by default, as torchtitan's do (``expert_dtype="bfloat16"``).

Through torchtitan's own launcher and Trainer (docs/torchtitan.md): one flag,
``--override.imports spmd_moe.integrations.torchtitan.overrides.spmd_moe``, or the config
module ``--module spmd_moe.integrations.torchtitan --config qwen3_moe_debug``. For the
Trainer's ``verify_module_protocol`` every part of an SpmdMoE (router, gate, experts) is a
torchtitan Module (protocol subclasses of the core classes, _PARTS); MoE configs that a
float8/MX/LoRA converter or a DeepEP/HybridEP dispatcher changed are refused by name;
under torchtitan's DTensor backends the layer takes DTensor activations and keeps its
parameters as DTensors on torchtitan's meshes (param_layouts).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from jaxtyping import Float
from torch import nn
from torchtitan.models.common.linear import Linear as TitanLinear
from torchtitan.models.common.moe import GroupedExperts as TitanGroupedExperts
from torchtitan.models.common.moe import MoE as TitanMoE
from torchtitan.models.common.moe import RoutedExperts as TitanRoutedExperts
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher
from torchtitan.protocols.module import Module as TitanModule

from spmd_moe.checkpoint import shard_state_dict
from spmd_moe.config import DispatchKind, MoEConfig, PaddingPolicy
from spmd_moe.errors import ConfigError, PaddingError
from spmd_moe.experts import GroupedExperts, SharedExperts
from spmd_moe.moe import AnyLayout, Invariant, Layout, MoE, Replicated, RoutedExperts, Sequence
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, as_inv, as_rep, as_var
from spmd_moe.router import TopKRouter

__all__ = [
    "SpmdMoE", "moe_config_from_torchtitan", "use_spmd_moe", "choose_layout", "collect_routes", "force_routes",
]

_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


# The adapter's padding policy (SpmdMoE.Config.padding's default; MoEConfig.padding has
# none): 'pad', because torchtitan hands the layer whatever token count its batch holds
# (B*L not a multiple of the EP size without sequence parallel, uneven per-rank rows in
# scoring passes), and pad rows are never routed, counted or given a gradient, so
# padding changes no result. Set padding='error' to refuse such batches instead.
TITAN_PADDING: PaddingPolicy = "pad"


def moe_config_from_torchtitan(
    cfg: Any, *, padding: PaddingPolicy, expert_dtype: torch.dtype | None = torch.bfloat16,
    dispatcher: DispatchKind = "auto",
) -> MoEConfig:
    """spmd_moe's MoEConfig with the routing semantics of a torchtitan MoE.Config.
    ``padding`` has no default: say 'pad' or 'error' (the adapter passes TITAN_PADDING)."""
    _refuse_converted(cfg)
    router = cfg.router
    inner = cfg.routed_experts.inner_experts
    if getattr(router.gate, "bias", False):
        raise ConfigError(
            "torchtitan MoE.Config.router.gate.bias: expected False (spmd_moe's gate has no "
            "bias), got True. Fix: build the router with bias=False."
        )
    if getattr(router, "_debug_force_load_balance", False):
        raise ConfigError(
            "torchtitan MoE.Config.router._debug_force_load_balance: expected False, got True. "
            "Fix: turn the debug round-robin routing off (spmd_moe has forced routes instead)."
        )
    if not (cfg.num_experts == router.num_experts == inner.num_experts):
        raise ConfigError(
            f"torchtitan MoE.Config.num_experts: expected the MoE, router and experts to agree, "
            f"got {cfg.num_experts}, {router.num_experts}, {inner.num_experts}. Fix: set the "
            "same num_experts on all three."
        )
    shared_hidden = None
    if cfg.shared_experts is not None:
        shared_hidden = int(cfg.shared_experts.w1.out_features)
    return MoEConfig(
        dim=int(inner.dim), hidden_dim=int(inner.hidden_dim), num_experts=int(inner.num_experts),
        top_k=int(router.top_k), score_func=router.score_func, route_norm=bool(router.route_norm),
        route_scale=float(router.route_scale), num_expert_groups=router.num_expert_groups,
        num_limited_groups=router.num_limited_groups, load_balance_coeff=cfg.load_balance_coeff,
        shared_hidden_dim=shared_hidden, expert_dtype=expert_dtype,
        dispatcher=dispatcher, padding=padding,
    )


def sequence_parallel_of(cfg: Any) -> bool:
    """Whether torchtitan's TP splits the tokens for this MoE config: its
    ``sequence_parallel`` if set, else what torchtitan's own sharding config says (the
    Trainer's update_from_config calls set_moe_sharding_config(enable_sp=...) before the
    override swaps the config, and the override keeps it: the MoE input is
    sequence-sharded exactly when SP is on), else torchtitan's default, True."""
    if cfg.sequence_parallel is not None:
        return bool(cfg.sequence_parallel)
    sc = cfg.sharding_config
    x_layout = (sc.in_src_shardings or {}).get("x_BLD") if sc is not None else None
    if x_layout is None:
        return True
    from torchtitan.models.common.decoder_sharding import dense_sequence_parallel_placement

    return bool(x_layout == dense_sequence_parallel_placement())


def _refuse_converted(cfg: Any) -> None:
    """spmd_moe runs its own gate, grouped GEMMs and token exchange: a torchtitan config
    whose MoE parts were converted (float8 / MXFP8 / NVFP4 Linear or GroupedExperts,
    LoRA, a padded or DeepEP/HybridEP token dispatcher) would be silently ignored, so it
    is refused, naming the part and its config class."""
    parts: list[tuple[str, Any, tuple[type, ...]]] = [
        ("router.gate", cfg.router.gate, (TitanLinear.Config,)),
        ("routed_experts", cfg.routed_experts, (TitanRoutedExperts.Config,)),
        ("routed_experts.inner_experts", cfg.routed_experts.inner_experts, (TitanGroupedExperts.Config,)),
        ("routed_experts.token_dispatcher", cfg.routed_experts.token_dispatcher,
         (LocalTokenDispatcher.Config, AllToAllTokenDispatcher.Config)),
    ]
    if cfg.shared_experts is not None:
        parts += [(f"shared_experts.{w}", getattr(cfg.shared_experts, w), (TitanLinear.Config,)) for w in ("w1", "w2", "w3")]
    for where, part, allowed in parts:
        if type(part) not in allowed:
            raise ConfigError(
                f"torchtitan MoE.Config.{where}: expected {' or '.join(a.__qualname__ for a in allowed)} "
                f"(spmd_moe runs its own gate, bf16 grouped GEMMs and token exchange), got "
                f"{type(part).__qualname__}, from a converter (float8/MX/NVFP4/LoRA) or a "
                "moe_comm_backend other than 'standard'. spmd_moe would ignore it. Fix: leave the "
                "MoE out of the converter (e.g. Float8LinearConverter filter_fqns=['moe'], no "
                "grouped-experts converter) and use moe_comm_backend='standard', or train this "
                "model with torchtitan's own MoE."
            )


def choose_layout(parallel_dims: Any, sequence_parallel: bool, shared_experts: bool) -> Layout:
    """The spmd_moe layout for torchtitan's ParallelDims (see the module docstring).
    torchtitan's TP without sequence parallel replicates activations and hands every TP
    rank their complete gradient (Megatron's convention): layout 'invariant' (Inv in,
    Inv out) takes and gives exactly that, so no gradient hook is needed at the
    boundary. Sequence parallel, or EP drawn from data parallel: 'sequence'."""
    tp, ep = int(parallel_dims.tp), int(parallel_dims.ep)
    if ep <= 1:
        if tp > 1:
            return "sequence" if sequence_parallel else "invariant"
        return "replicated"  # one device: every layout is the same
    if tp > 1:
        if ep != tp:
            raise ConfigError(
                f"ParallelDims: expected expert_parallel_degree == tensor_parallel_degree when "
                f"TP is on (spmd_moe shards experts over the TP group: TP2EP), got ep={ep}, "
                f"tp={tp}. Fix: set expert_parallel_degree={tp}, or turn TP off and draw EP "
                "from data parallel."
            )
        return "sequence" if sequence_parallel else "invariant"
    if shared_experts:
        raise ConfigError(
            f"ParallelDims: shared experts with EP drawn from data parallel (ep={ep}, tp=1): "
            "expected TP2EP (ep == tp), got tp=1; spmd_moe shards the shared experts over the "
            "EP group, which data-parallel gradient reduction would mix. Fix: use "
            "tensor_parallel_degree == expert_parallel_degree for models with shared experts."
        )
    return "sequence"


def reshard(moe: MoE[Any], pctx: ParallelContext[EP], layout: Layout) -> None:
    """Rebuild moe's parallel pieces for the expert axis pctx, in place. Materialized
    weights are sliced from the current (full, EP=1) ones; meta weights stay meta."""
    if moe.pctx.size != 1:
        raise ConfigError(
            f"{moe.name}: reshard: expected a layer built for one device, got one already on "
            f"axis '{moe.pctx.name}' of size {moe.pctx.size}. Fix: parallelize once."
        )
    dev = moe.router.gate.weight.device
    full = None if dev.type == "meta" else {k: v.detach().clone() for k, v in moe.state_dict().items()}
    fresh = MoE(moe.cfg, pctx, layout=layout, device=dev, name=moe.name)
    internal = set(vars(nn.Module()))
    for name, child in fresh.named_children():
        setattr(moe, name, child)
    for key, value in vars(fresh).items():
        if key not in internal:
            object.__setattr__(moe, key, value)
    if full is not None:
        moe.load_state_dict(shard_state_dict(full, moe.cfg, pctx), strict=True)


class _MoEPart(TitanModule):  # type: ignore[misc]
    """torchtitan's Module protocol for the parts of an SpmdMoE (router, gate, routed and
    shared experts): ``model.verify_module_protocol()`` (run by torchtitan's Trainer)
    requires every submodule to be a torchtitan Module. The parts are the core's own
    classes underneath (the core does not import torchtitan); their SpmdMoE builds,
    initializes and parallelizes them (its init_states / parallelize do not recurse), so
    a direct call on a part is refused rather than half-done."""

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        raise ConfigError(
            f"{type(self).__name__}.init_states: expected the call on the SpmdMoE that owns "
            "this part (it initializes router, experts and buffers together, in torchtitan's "
            "order), got a direct call. Fix: call init_states on the model or the MoE layer."
        )

    def parallelize(self, parallel_dims: Any) -> None:
        raise ConfigError(
            f"{type(self).__name__}.parallelize: expected the call on the SpmdMoE that owns "
            "this part (it shards the experts and picks the layout), got a direct call. Fix: "
            "call parallelize(parallel_dims) on the model or the MoE layer."
        )


class SpmdTopKRouter(TopKRouter, _MoEPart):
    """spmd_moe's TopKRouter under torchtitan's Module protocol."""


class SpmdLinear(nn.Linear, _MoEPart):
    """nn.Linear (the router gate, the shared experts' w1/w2/w3) under torchtitan's Module protocol."""


class SpmdRoutedExperts(RoutedExperts, _MoEPart):
    """spmd_moe's RoutedExperts (torchtitan's key path) under torchtitan's Module protocol."""


class SpmdGroupedExperts(GroupedExperts, _MoEPart):
    """spmd_moe's GroupedExperts under torchtitan's Module protocol."""


class SpmdSharedExperts(SharedExperts, _MoEPart):
    """spmd_moe's SharedExperts under torchtitan's Module protocol."""


# Core class -> its protocol subclass. The subclasses add no state (only methods and
# torchtitan's class-level defaults), so a part's class is switched in place.
_PARTS: dict[type, type] = {
    TopKRouter: SpmdTopKRouter, nn.Linear: SpmdLinear, RoutedExperts: SpmdRoutedExperts,
    GroupedExperts: SpmdGroupedExperts, SharedExperts: SpmdSharedExperts,
}


def _conform_parts(moe: nn.Module) -> None:
    """Switch every submodule of moe to its torchtitan-protocol subclass (_PARTS)."""
    for fqn, m in moe.named_modules():
        if isinstance(m, TitanModule):
            continue
        part = _PARTS.get(type(m))
        if part is None:
            raise ConfigError(
                f"SpmdMoE part '{fqn}' ({type(m).__qualname__}): expected one of "
                f"{sorted(c.__qualname__ for c in _PARTS)} or a torchtitan Module (torchtitan's "
                "Trainer rejects other submodules in verify_module_protocol), got a class the "
                "adapter does not know. Fix: add it to spmd_moe.integrations.torchtitan._PARTS."
            )
        m.__class__ = part


# torchtitan's MoE registers its children in this order (routed experts, router, shared
# experts); the core MoE registers the router first. The order is that of
# model.parameters(), which torchtitan's Trainer hands to clip_grad_norm_: the total norm
# sums the per-parameter norms in that order, so another order changes the last bit of the
# norm and, once clipping is active, of every clipped gradient (issue 15's H200 run: grad
# norm 1 ulp off at step 5, losses apart from step 6). FSDP's all-gather/reduce-scatter
# buffers and the optimizer's parameter lists follow the same order.
_TITAN_CHILD_ORDER = ("routed_experts", "router", "shared_experts")


def _titan_child_order(moe: nn.Module) -> None:
    """Re-register moe's children in torchtitan's MoE order (_TITAN_CHILD_ORDER), others after."""
    children = moe._modules
    ordered = {k: children[k] for k in _TITAN_CHILD_ORDER if k in children}
    ordered.update({k: v for k, v in children.items() if k not in ordered})
    children.clear()
    children.update(ordered)


class SpmdMoE(TitanModule, MoE[AnyLayout]):  # type: ignore[misc]
    """spmd_moe.MoE built from a torchtitan Config, with torchtitan's Module protocol."""

    @dataclass(kw_only=True, slots=True)
    class Config(TitanMoE.Config):  # type: ignore[misc]
        # spmd_moe options on top of torchtitan's MoE.Config fields.
        expert_dtype: str | None = "bfloat16"  # torchtitan runs its experts in bf16
        # 'auto': from ParallelDims in parallelize() (choose_layout); or 'invariant' /
        # 'sequence' / 'replicated' (Partial input gradient: not torchtitan's convention).
        layout: Literal["auto", "replicated", "invariant", "sequence"] = "auto"
        # Whether torchtitan's TP splits the tokens (parallelism.enable_sequence_parallel).
        # None: read it from the sharding_config torchtitan's update_from_config put on
        # this MoE config (the Trainer path); True (torchtitan's default) when there is none.
        sequence_parallel: bool | None = None
        dispatcher: Literal["auto", "all_to_all", "all_gather"] = "auto"
        # What to do with tokens that do not split over the EP ranks: 'pad' (the
        # adapter's stated policy, TITAN_PADDING: padding changes no result) or 'error'.
        padding: Literal["pad", "error"] = TITAN_PADDING

    def __init__(self, config: Any) -> None:
        if config.expert_dtype not in _DTYPES:
            raise ConfigError(
                f"SpmdMoE.Config.expert_dtype: expected one of {sorted(k for k in _DTYPES if k)} "
                f"or None, got {config.expert_dtype!r}. Fix: use 'bfloat16' (torchtitan's) or None."
            )
        if config.padding not in ("pad", "error"):
            raise ConfigError(
                f"SpmdMoE.Config.padding: expected 'pad' or 'error', got {config.padding!r}. "
                "Fix: padding='pad' (pad the tokens to a multiple of the EP size; pad rows are "
                "never routed, counted or given a gradient) or padding='error' (refuse such batches)."
            )
        mcfg = moe_config_from_torchtitan(
            config, expert_dtype=_DTYPES[config.expert_dtype], dispatcher=config.dispatcher,
            padding=config.padding,
        )
        MoE.__init__(self, mcfg, None, layout="replicated", name="moe")
        self.titan_config = config
        _conform_parts(self)
        _titan_child_order(self)

    def forward(self, x_BLD: Float[torch.Tensor, "*B D"]) -> Float[torch.Tensor, "*B D"]:  # type: ignore[override]
        """[B, L, D] -> [B, L, D] (or [T, D] -> [T, D]); this rank's tokens, as torchtitan
        hands them over: plain tensors, whose placement on the EP axis the layout chosen
        in parallelize() says (stated in _run_layout, verified in debug mode). Like
        torchtitan's MoE, tokens are counted for the expert bias in training mode only
        (an eval-mode scoring pass must not move the next bias update).

        torchtitan's DTensor backends (spmd_backend 'partial_dtensor' / 'full_dtensor')
        hand over a DTensor on the TP mesh: Shard(1) under sequence parallel (this rank's
        slice: layout 'sequence'), Replicate without it (layout 'invariant'). The layer
        runs on its local tensor and returns a DTensor with the same placements (as
        torchtitan's MoE does through its sharding config's local_map); to_local's backward
        takes the output gradient as those placements say, i.e. complete for Replicate."""
        from torch.distributed.tensor import DTensor

        if isinstance(x_BLD, DTensor):
            if any(p.is_partial() for p in x_BLD.placements):
                raise ConfigError(
                    f"{self.name}: x_BLD (from torchtitan): expected a DTensor sharded or "
                    f"replicated on its mesh, got placements {tuple(x_BLD.placements)}. Fix: "
                    "reduce the partial sum before the MoE (torchtitan's block does)."
                )
            with self._local_params():
                y_BLD = self._forward_plain(x_BLD.to_local())
            return DTensor.from_local(y_BLD, x_BLD.device_mesh, x_BLD.placements, run_check=False)
        with self._local_params():
            return self._forward_plain(x_BLD)

    def _forward_plain(self, x_BLD: Float[torch.Tensor, "*B D"]) -> Float[torch.Tensor, "*B D"]:
        if self.training:
            return self._forward_counted(x_BLD)
        kept_E = self.tokens_per_expert_E.clone()
        try:
            return self._forward_counted(x_BLD)
        finally:
            with torch.no_grad():
                self.tokens_per_expert_E.copy_(kept_E)

    def _forward_counted(self, x_BLD: Float[torch.Tensor, "*B D"]) -> Float[torch.Tensor, "*B D"]:
        if x_BLD.ndim != 3:
            return self._run_layout(x_BLD)
        B, L, D = x_BLD.shape
        return self._run_layout(x_BLD.reshape(B * L, D)).view(B, L, D)

    def _run_layout(self, x_TD: Float[torch.Tensor, "T D"]) -> Float[torch.Tensor, "T D"]:
        """State torchtitan's placement of the tokens on the EP axis (verified in debug
        mode) and run the layer. No gradient bridging: 'invariant' is torchtitan's own
        convention for TP without sequence parallel (complete gradients on every rank)."""
        what = f"{self.name}: x_TD (from torchtitan)"
        try:
            # The cast names the layout the branch tests, so mypy checks the stated
            # placement against that layout's typed forward.
            if self.layout == "invariant":  # TP without SP: the same tokens on every TP rank
                return MoE.forward(cast("MoE[Invariant]", self), as_inv(x_TD, self.pctx, what))
            if self.layout == "sequence":  # sequence parallel / EP from DP: this rank's slice
                return MoE.forward(cast("MoE[Sequence]", self), as_var(x_TD, self.pctx, what))
            # 'replicated' (one device, or chosen explicitly): the input gradient is Partial.
            return MoE.forward(cast("MoE[Replicated]", self), as_rep(x_TD, self.pctx, what))
        except PaddingError as e:  # raised on every rank alike, before any data exchange
            raise PaddingError(
                f"{e} (torchtitan: the policy is SpmdMoE.Config.padding, now "
                f"{self.titan_config.padding!r}: use_spmd_moe(spec, padding='pad') lets the layer "
                "pad; padding='error' refuses)"
            ) from e

    def parallelize(self, parallel_dims: Any) -> None:
        """Shard the experts over torchtitan's EP mesh and pick the layout. Replaces
        torchtitan's sharding_config machinery for this module (the placements are
        spmd_moe's own; see docs/torchtitan.md)."""
        if getattr(self, "_parallelized", False):
            raise ConfigError(
                f"{self.name}: parallelize: expected one call, got a second. Fix: call "
                "model.parallelize(parallel_dims) once."
            )
        self._parallelized = True
        c = self.titan_config
        layout: Layout
        if c.layout == "auto":
            layout = choose_layout(parallel_dims, sequence_parallel_of(c), self.shared_experts is not None)
        else:
            layout = c.layout
        pctx = ParallelContext.from_parallel_dims(parallel_dims)
        reshard(self, pctx, layout)
        _conform_parts(self)  # reshard built fresh core parts
        _titan_child_order(self)
        if pctx.size > 1 and int(parallel_dims.tp) > 1:
            # The gate sees this rank's tokens only, so its gradient is a summand over the
            # TP(=EP) group, which no data-parallel reduction covers: the layer states the
            # gate weight Invariant there (invariant_to_replicate's backward sums it).
            self.router.gate_grad = "complete"
        if getattr(parallel_dims, "spmd_backend", "spmd_types") != "spmd_types":
            self._distribute_params(parallel_dims)

    def param_layouts(self, parallel_dims: Any) -> dict[str, Any]:
        """Parameter name -> the torchtitan SpmdLayout of this rank's tensor: the gate
        replicated; the experts E/n over 'ep' (torchtitan's sparse expert layout) or, with
        ep == 1, replicated (spmd_moe does not TP-shard experts); the shared experts split
        over the EP(=TP) group like torchtitan's colwise (w1, w3) / rowwise (w2) TP, or
        replicated with ep == 1."""
        import spmd_types as spmd
        from torchtitan.models.common.decoder_sharding import dense_param_placement
        from torchtitan.models.common.moe_sharding import expert_param_placement_dense, expert_param_placement_sparse

        ep = int(parallel_dims.ep)
        rep = dense_param_placement(tp=spmd.R)
        experts = expert_param_placement_sparse() if ep > 1 else expert_param_placement_dense(tp_placement=spmd.R)
        out: dict[str, Any] = {"router.gate.weight": rep}
        out.update({f"routed_experts.inner_experts.{w}": experts for w in ("w1_EFD", "w2_EDF", "w3_EFD")})
        if self.shared_experts is not None:
            for w, dim in (("w1", 0), ("w2", 1), ("w3", 0)):
                out[f"shared_experts.{w}.weight"] = dense_param_placement(tp=spmd.S(dim)) if ep > 1 else rep
        return out

    def _distribute_params(self, parallel_dims: Any) -> None:
        """torchtitan's DTensor backends ('partial_dtensor', 'full_dtensor'): make each
        parameter a DTensor on the mesh torchtitan resolves for its layout (param_layouts),
        from this rank's shard (DTensor.from_local: the tensors are already sliced by
        reshard), as torchtitan's Module._distribute_states does for its own modules.
        FSDP then shards them like torchtitan's, and torchtitan's EP gradient clipping
        finds the experts on a mesh with 'ep'. The forward runs on the local tensors
        (_local_params)."""
        from torch.distributed.tensor import DTensor
        from torchtitan.protocols.sharding import resolve_placements

        layouts = self.param_layouts(parallel_dims)
        names = {n for n, _ in self.named_parameters()}
        if names != set(layouts):
            raise ConfigError(
                f"{self.name}: parameters {sorted(names)}, placements for {sorted(layouts)}: expected "
                "the same names. Fix: add the new parameter to SpmdMoE.param_layouts."
            )
        for fqn, layout in layouts.items():
            mesh = parallel_dims.resolve_mesh(layout.axes())
            if mesh is None:  # no model-parallel axis of this layout is on
                continue
            owner, _, pname = fqn.rpartition(".")
            mod = self.get_submodule(owner)
            p = getattr(mod, pname)
            local = DTensor.from_local(p.detach(), mesh, resolve_placements(layout, mesh), run_check=False)
            mod.register_parameter(pname, nn.Parameter(local, requires_grad=p.requires_grad))

    @contextlib.contextmanager
    def _local_params(self) -> Iterator[None]:
        """For one call: every DTensor parameter replaced by its local tensor (to_local,
        so gradients flow back to the DTensor), then put back. The core works on this
        rank's tensors; FSDP's unsharded parameters are in place by now (its pre-forward
        hook ran on the block) and are restored before its post-forward reshard."""
        from torch.distributed.tensor import DTensor

        swapped: list[tuple[dict[str, Any], str, Any]] = []
        for mod in self.modules():
            params: dict[str, Any] = mod._parameters
            for name, p in list(params.items()):
                if isinstance(p, DTensor):
                    swapped.append((params, name, p))
                    params[name] = p.to_local()
        try:
            yield
        finally:
            for params, name, p in swapped:
                params[name] = p

    def init_states(self, seed: int | None = None, std: float = 0.02, *, buffer_device: torch.device | None = None) -> None:
        """torchtitan protocol: initialize with the Config's param_init functions (or,
        with a seed, spmd_moe's layout-independent seeded init), zero the buffers."""
        if seed is not None:
            MoE.init_states(self, seed, std)
        else:
            self._titan_param_init(std)
        if buffer_device is not None:
            self.tokens_per_expert_E = self.tokens_per_expert_E.to(buffer_device)
            if self.expert_bias_E is not None:
                self.expert_bias_E = self.expert_bias_E.to(buffer_device)
        with torch.no_grad():
            self.tokens_per_expert_E.zero_()
            if self.expert_bias_E is not None:
                self.expert_bias_E.zero_()

    @torch.no_grad()
    def _titan_param_init(self, std: float) -> None:
        c = self.titan_config

        def init(p: torch.Tensor, fn: Any) -> None:
            if fn is None:
                nn.init.normal_(p, std=std)
            else:
                fn(p)

        inits = c.routed_experts.inner_experts.param_init or {}
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            init(getattr(self.experts, name), inits.get(name))
        init(self.router.gate.weight, (c.router.gate.param_init or {}).get("weight"))
        if self.shared_experts is not None and c.shared_experts is not None:
            for name in ("w1", "w2", "w3"):
                init(getattr(self.shared_experts, name).weight, (getattr(c.shared_experts, name).param_init or {}).get("weight"))


def _moe_configs(model_config: Any) -> list[tuple[Any, Any]]:
    """(layer config, its moe config) for every MoE layer of a model config or ModelSpec."""
    model = getattr(model_config, "model", model_config)
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ConfigError(
            f"use_spmd_moe: expected a torchtitan model Config (or ModelSpec) with .layers, got "
            f"{type(model_config).__name__}. Fix: pass e.g. model_registry('30B-A3B') or its .model."
        )
    return [(layer, layer.moe) for layer in layers if getattr(layer, "moe", None) is not None]


def use_spmd_moe(model_config: Any, **options: Any) -> Any:
    """Swap every layer's torchtitan MoE.Config for an SpmdMoE.Config with the same
    fields (options: expert_dtype, layout, sequence_parallel, dispatcher, padding).
    Mutates and returns model_config (a model Config or a ModelSpec)."""
    known = {f.name for f in dataclasses.fields(SpmdMoE.Config)}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"use_spmd_moe: unknown options {bad}; expected some of {sorted(known)}.")
    found = _moe_configs(model_config)
    if not found:
        raise ConfigError("use_spmd_moe: expected a model with MoE layers, found none. Fix: pass an MoE flavor.")
    for layer, moe in found:
        if isinstance(moe, SpmdMoE.Config):
            layer.moe = dataclasses.replace(moe, **options)
            continue
        if not isinstance(moe, TitanMoE.Config):
            raise ConfigError(
                f"use_spmd_moe: expected torchtitan MoE.Config layers, got {type(moe).__name__}. "
                "Fix: only models built on torchtitan.models.common.moe.MoE are supported."
            )
        fields = {f.name: getattr(moe, f.name) for f in dataclasses.fields(moe) if f.init}
        layer.moe = SpmdMoE.Config(**fields, **options)
    return model_config


def moe_layers(model: nn.Module) -> dict[str, MoE[Any]]:
    """Every spmd_moe MoE layer of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def collect_routes(model: nn.Module, *, clear: bool = True) -> dict[str, list[torch.Tensor]]:
    """The routes each MoE layer recorded (record_routes=True): layer name -> one [T, K]
    tensor of expert ids per forward call, for this rank's tokens."""
    out = {name: list(m.recorded_routes) for name, m in moe_layers(model).items()}
    if clear:
        for m in moe_layers(model).values():
            m.recorded_routes.clear()
    return out


def force_routes(model: nn.Module, routes: dict[str, torch.Tensor] | None) -> None:
    """Force each MoE layer's routes for the next forward (layer name -> [T, K] expert
    ids for this rank's tokens); None releases every layer."""
    layers = moe_layers(model)
    if routes is None:
        for m in layers.values():
            m.forced_routes_TK = None
        return
    unknown = sorted(set(routes) - set(layers))
    if unknown:
        raise ConfigError(
            f"force_routes: layers {unknown} are not spmd_moe MoE layers of this model "
            f"(it has {sorted(layers)}). Fix: use the names collect_routes returned."
        )
    for name, m in layers.items():
        m.forced_routes_TK = routes.get(name)


def tiny_qwen3_moe_config(
    *, n_layers: int = 2, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 32,
    moe_hidden_dim: int = 32, num_experts: int = 8, top_k: int = 2, vocab_size: int = 128,
    max_seq_len: int = 256, load_balance_coeff: float | None = 1e-3, rope_theta: float = 1e6,
) -> Any:
    """torchtitan's Qwen3 ``debugmodel_moe`` spec shrunk for CPU tests, with SDPA
    attention (torchtitan's flex attention has no CPU backward). Still torchtitan's
    own MoE.Config: pass it to use_spmd_moe to swap the MoE."""
    import torchtitan.models.qwen3 as q
    from torchtitan.models.common import CosSinRoPE
    from torchtitan.models.common.attention import ScaledDotProductAttention

    cfg = q.qwen3_configs["debugmodel_moe"](attn_backend="flex")
    cfg.layers = q._build_qwen3_moe_layers(
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        moe_hidden_dim=moe_hidden_dim, num_experts=num_experts, top_k=top_k, attn_backend="flex",
        moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=rope_theta),
    )
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        layer.moe.load_balance_coeff = load_balance_coeff
    cfg.dim, cfg.vocab_size = dim, vocab_size
    cfg.tok_embeddings.num_embeddings, cfg.tok_embeddings.embedding_dim = vocab_size, dim
    cfg.lm_head.in_features, cfg.lm_head.out_features = dim, vocab_size
    cfg.norm.normalized_shape = dim
    return cfg


# ----------------------------------------------------------------------------- parity trainer
