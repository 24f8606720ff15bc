"""MoEConfig: the validated description of one MoE layer."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from spmd_moe.errors import ConfigError

ScoreFunc = Literal["softmax", "sigmoid"]
PaddingPolicy = Literal["pad", "error"]
DispatchKind = Literal["auto", "all_to_all", "all_gather"]
KernelChoice = Literal["fast", "torchtitan"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer. Semantics follow torchtitan 0.3.0's MoE so weights move both ways.

    dim: model dim D. hidden_dim: per-expert SwiGLU hidden dim F.
    score_func / route_norm / route_scale: as torchtitan's TokenChoiceTopKRouter.
    num_expert_groups / num_limited_groups: group-limited routing (DeepSeek-V3 style).
    load_balance_coeff: not None turns on the aux-loss-free expert bias (it changes
        selection only, never the gate weights).
    shared_hidden_dim: hidden dim of the shared-expert SwiGLU MLP; None = no shared experts.
    shared_gate: scale the shared experts' output per token by sigmoid(x_TD @ g_D), a
        learned [1, D] gate (Qwen2-MoE's shared_expert_gate); needs shared_hidden_dim.
    expert_dtype: dtype the expert GEMMs run in; None = the input dtype (fp32 stays fp32).
        torch.bfloat16 reproduces torchtitan, whose experts always run in bf16.
    padding: what to do when the tokens do not split evenly over the expert axis (T not
        a multiple of its size in the replicated layouts; unequal per-rank slices where
        the sequence layout's all-gather paths need equal ones): 'pad' (pad, and slice
        the pad rows off; they are never routed or counted) or 'error' (refuse). None
        (the default) means not told: a layer that would need to pad raises
        PaddingError offering both choices.
    dispatcher: 'all_to_all' (prefill; one host sync for split sizes), 'all_gather'
        (decode; no host sync) or 'auto' (all_gather when T <= decode_max_tokens).
    ep_chunks: pieces the all_to_all dispatcher splits each rank's tokens into, so that
        the exchanges of one piece overlap the expert GEMMs of another (1: no split).
    ep_equal_tokens: the caller promises that every rank of the expert axis always passes
        the same number of tokens in the 'sequence' layout (torchtitan: a fixed local batch
        x sequence length). The prefill exchange then has a fixed size and needs no host
        read (kernels='fast'; spmd_moe.dispatch.all_to_all), and the layer exchanges no
        per-rank counts. The replicated layouts have equal chunks by construction. Debug
        mode checks the promise on every call; with debug off a broken promise is not
        detected (NCCL would see mismatched sizes).
    kernels: 'fast' (default: on CUDA, the fused Triton kernels where they apply, e.g.
        spmd_moe.kernels.decode for inference at T <= 64 on one rank) or 'torchtitan'
        (torch ops only, the kernel choice that is bitwise equal to torchtitan 0.3.0).
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    route_norm: bool = False
    route_scale: float = 1.0
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None
    load_balance_coeff: float | None = None
    shared_hidden_dim: int | None = None
    shared_gate: bool = False
    param_dtype: torch.dtype = torch.float32
    expert_dtype: torch.dtype | None = None
    padding: PaddingPolicy | None = None
    dispatcher: DispatchKind = "auto"
    decode_max_tokens: int = 16
    ep_chunks: int = 1
    ep_equal_tokens: bool = False
    kernels: KernelChoice = "fast"

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "num_experts", "top_k", "decode_max_tokens", "ep_chunks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(
                    f"MoEConfig.{name}: expected a positive int, got {v!r}. "
                    f"Fix: pass {name}>=1."
                )
        if self.shared_hidden_dim is not None and self.shared_hidden_dim <= 0:
            raise ConfigError(
                f"MoEConfig.shared_hidden_dim: expected a positive int or None, got "
                f"{self.shared_hidden_dim!r}. Fix: pass None to turn shared experts off."
            )
        if self.shared_gate and self.shared_hidden_dim is None:
            raise ConfigError(
                "MoEConfig.shared_gate: expected shared_hidden_dim set (the gate scales the "
                "shared experts' output), got shared_hidden_dim=None. Fix: set shared_hidden_dim "
                "or shared_gate=False."
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"MoEConfig.top_k: expected top_k <= num_experts={self.num_experts}, got "
                f"{self.top_k}. Fix: lower top_k or add experts."
            )
        if self.kernels not in ("fast", "torchtitan"):
            raise ConfigError(
                f"MoEConfig.kernels: expected 'fast' or 'torchtitan', got {self.kernels!r}. "
                "Fix: 'torchtitan' for torch kernels bitwise equal to torchtitan, else 'fast'."
            )
        if self.score_func not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"MoEConfig.score_func: expected 'softmax' or 'sigmoid', got "
                f"{self.score_func!r}. Fix: use one of those two."
            )
        if not (self.route_scale > 0):
            raise ConfigError(
                f"MoEConfig.route_scale: expected > 0, got {self.route_scale!r}. "
                "Fix: use 1.0 for no scaling."
            )
        self._check_groups()
        if self.load_balance_coeff is not None and not (self.load_balance_coeff > 0):
            raise ConfigError(
                f"MoEConfig.load_balance_coeff: expected > 0 or None, got "
                f"{self.load_balance_coeff!r}. Fix: pass None to turn the expert bias off."
            )
        for name in ("param_dtype", "expert_dtype"):
            dt = getattr(self, name)
            if dt is not None and dt not in _FLOAT_DTYPES:
                raise ConfigError(
                    f"MoEConfig.{name}: expected one of {_FLOAT_DTYPES}, got {dt!r}. "
                    "Fix: use a floating dtype."
                )
        if self.padding not in (None, "pad", "error"):
            raise ConfigError(
                f"MoEConfig.padding: expected 'pad', 'error' or None, got {self.padding!r}. "
                "Fix: choose 'pad' (pad to a multiple of the EP size) or 'error'."
            )
        if self.dispatcher not in ("auto", "all_to_all", "all_gather"):
            raise ConfigError(
                f"MoEConfig.dispatcher: expected 'auto', 'all_to_all' or 'all_gather', got "
                f"{self.dispatcher!r}. Fix: use 'auto'."
            )

    def _check_groups(self) -> None:
        g, lg = self.num_expert_groups, self.num_limited_groups
        if g is None and lg is None:
            return
        if g is None or lg is None:
            raise ConfigError(
                "MoEConfig.num_expert_groups/num_limited_groups: expected both set or both "
                f"None, got num_expert_groups={g!r}, num_limited_groups={lg!r}. "
                "Fix: set both for group-limited routing."
            )
        if g <= 0 or lg <= 0:
            raise ConfigError(
                f"MoEConfig.num_expert_groups/num_limited_groups: expected positive, got "
                f"{g}/{lg}. Fix: use positive group counts."
            )
        if self.num_experts % g != 0:
            raise ConfigError(
                f"MoEConfig.num_expert_groups: expected a divisor of num_experts="
                f"{self.num_experts}, got {g}. Fix: choose groups that divide the experts."
            )
        if self.num_experts // g < 2:
            raise ConfigError(
                f"MoEConfig.num_expert_groups: expected at least 2 experts per group "
                f"(group score = sum of its top-2), got {self.num_experts // g}. "
                "Fix: use fewer groups."
            )
        if lg > g:
            raise ConfigError(
                f"MoEConfig.num_limited_groups: expected <= num_expert_groups={g}, got {lg}. "
                "Fix: lower num_limited_groups."
            )
        if lg * (self.num_experts // g) < self.top_k:
            raise ConfigError(
                f"MoEConfig.num_limited_groups: expected the kept groups to hold at least "
                f"top_k={self.top_k} experts, got {lg} kept groups x {self.num_experts // g} "
                f"experts = {lg * (self.num_experts // g)}. Fix: keep more groups or lower top_k."
            )

    def check_ep(self, ep_size: int) -> None:
        """Raise unless the experts shard evenly over ``ep_size`` ranks."""
        if self.num_experts % ep_size != 0:
            raise ConfigError(
                f"MoEConfig.num_experts: expected divisible by the EP size {ep_size}, got "
                f"{self.num_experts}. Fix: use an EP size that divides the experts "
                f"(e.g. {', '.join(str(d) for d in range(1, self.num_experts + 1) if self.num_experts % d == 0)})."
            )
        if self.shared_hidden_dim is not None and self.shared_hidden_dim % ep_size != 0:
            raise ConfigError(
                f"MoEConfig.shared_hidden_dim: expected divisible by the TP size {ep_size} "
                f"(shared experts are TP-sharded), got {self.shared_hidden_dim}. "
                "Fix: choose a shared hidden dim that the TP size divides."
            )

    def fingerprint(self) -> tuple[object, ...]:
        """Values every rank must agree on (checked before any data exchange)."""
        return tuple(str(getattr(self, f.name)) for f in fields(self))
