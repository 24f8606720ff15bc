"""Helpers shared by the TP2EP tests (test_tp2ep*.py, test_padding.py,
test_ranks_disagree.py). Everything here is importable at module top level, so the
spawned ranks of tests/dist_utils.py can unpickle the worker functions."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from spmd_moe import MoE, MoEConfig, ParallelContext
from spmd_moe.checkpoint import shard_state_dict
from spmd_moe.placement import EP

D, F_HID, E, K, S_HID = 16, 24, 8, 2, 16


def make_cfg(**kw: Any) -> MoEConfig:
    base: dict[str, Any] = dict(dim=D, hidden_dim=F_HID, num_experts=E, top_k=K)
    base.update(kw)
    return MoEConfig(**base)


def world_pctx() -> ParallelContext[EP]:
    return ParallelContext.from_group(dist.group.WORLD, name="tp")


def skew_bias(skew: str, num_experts: int, n: int) -> torch.Tensor | None:
    """expert_bias_E that forces the routing: every token picks expert 3 ('one_expert')
    or only experts of the last rank ('one_rank'). Scores are in (0, 1), so a +1 bias
    wins every top-k comparison; the gate weights still come from the unbiased scores."""
    if skew == "none":
        return None
    b = torch.zeros(num_experts)
    if skew == "one_expert":
        b[3 % num_experts] = 1.0
    elif skew == "one_rank":
        e = num_experts // n
        b[(n - 1) * e:] = 1.0
    else:
        raise ValueError(skew)
    return b


def build_pair(cfg: MoEConfig, pctx: ParallelContext[EP], layout: str, seed: int, skew: str = "none") -> tuple[MoE, MoE]:
    """(single-device MoE, this rank's sharded MoE) with the same weights: the sharded
    one is loaded with shard_state_dict of the single-device state dict."""
    full = MoE(cfg, layout=layout)
    full.init_states(seed)
    bias = skew_bias(skew, cfg.num_experts, pctx.size)
    if bias is not None:
        assert full.expert_bias_E is not None, "skewed cases need load_balance_coeff set"
        with torch.no_grad():
            full.expert_bias_E.copy_(bias)
    moe = MoE(cfg, pctx, layout=layout)
    moe.load_state_dict(shard_state_dict(full.state_dict(), cfg, pctx))
    return full, moe


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max |a - b| / max |b| (0 for empty tensors; None = no gradient = zeros)."""
    if a is None and b is None:
        return 0.0
    if a is None:
        assert b is not None
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    den = float(b.abs().max())
    num = float((a.double() - b.double()).abs().max())
    if den == 0.0:
        return num
    return num / den


def token_slice(T: int, n: int, rank: int) -> slice:
    """This rank's contiguous, possibly uneven (and possibly empty) token slice for
    layout 'sequence': torch.tensor_split's convention."""
    sizes = [len(c) for c in torch.tensor_split(torch.arange(T), n)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class DispatchSpy:
    """Counts which dispatcher a sharded MoE really ran (so a case that claims to cover
    the all_gather path cannot silently take the all_to_all one)."""

    def __init__(self, moe: MoE) -> None:
        self.calls: dict[str, int] = {"all_to_all": 0, "all_gather": 0}
        if moe.prefill_dispatcher is moe.decode_dispatcher:
            return  # one device: the local dispatcher, neither collective
        for attr, name in (("prefill_dispatcher", "all_to_all"), ("decode_dispatcher", "all_gather")):
            d = getattr(moe, attr)
            orig = d.dispatch

            def wrapped(*a: Any, _orig: Any = orig, _name: str = name, **kw: Any) -> Any:
                self.calls[_name] += 1
                return _orig(*a, **kw)

            d.dispatch = wrapped
            # The chunked all-to-all runs dispatch, experts and return in pipelined().
            orig_p = d.pipelined

            def wrapped_p(*a: Any, _orig: Any = orig_p, _name: str = name, **kw: Any) -> Any:
                out = _orig(*a, **kw)
                if out is not None:
                    self.calls[_name] += 1
                return out

            d.pipelined = wrapped_p
            # kernels='fast' CUDA inference: the all-to-all runs everything in weighted().
            orig_w = d.weighted

            def wrapped_w(*a: Any, _orig: Any = orig_w, _name: str = name, **kw: Any) -> Any:
                out = _orig(*a, **kw)
                if out is not None:
                    self.calls[_name] += 1
                return out

            d.weighted = wrapped_w

    def used(self) -> str:
        ran = [k for k, v in self.calls.items() if v]
        return "+".join(ran) if ran else "none"
