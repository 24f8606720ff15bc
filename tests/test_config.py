"""Every MoEConfig validation error: class ConfigError (an SpmdMoeError), raised at
construction (or by check_ep / MoE(...) for the EP size), with a message that names
the field, says expected and got, and gives a fix."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from spmd_moe.config import MoEConfig
from spmd_moe.errors import ConfigError, SpmdMoeError
from spmd_moe.moe import MoE
from spmd_moe.parallel import ParallelContext

BASE: dict[str, Any] = dict(dim=16, hidden_dim=8, num_experts=8, top_k=2)


def assert_config_error(exc: pytest.ExceptionInfo[ConfigError], field: str, *fragments: str) -> None:
    msg = str(exc.value)
    assert isinstance(exc.value, SpmdMoeError)
    for part in (field, "expected", "got", "Fix:", *fragments):
        assert part in msg, f"{part!r} not in message: {msg}"


# (overrides of BASE, field named in the message, distinctive fragments)
BAD: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    ("dim-zero", dict(dim=0), "MoEConfig.dim", ("positive int", "got 0")),
    ("hidden-negative", dict(hidden_dim=-4), "MoEConfig.hidden_dim", ("positive int", "got -4")),
    ("experts-zero", dict(num_experts=0, top_k=1), "MoEConfig.num_experts", ("positive int",)),
    ("top_k-zero", dict(top_k=0), "MoEConfig.top_k", ("positive int", "got 0")),
    ("top_k-float", dict(top_k=2.0), "MoEConfig.top_k", ("positive int", "got 2.0")),
    ("dim-bool", dict(dim=True), "MoEConfig.dim", ("positive int", "got True")),
    ("decode_max_tokens-zero", dict(decode_max_tokens=0), "MoEConfig.decode_max_tokens", ("positive int",)),
    ("shared-zero", dict(shared_hidden_dim=0), "MoEConfig.shared_hidden_dim", ("positive int or None", "got 0")),
    ("top_k-gt-experts", dict(top_k=9), "MoEConfig.top_k", ("top_k <= num_experts=8", "got 9")),
    ("score_func", dict(score_func="relu"), "MoEConfig.score_func", ("'softmax' or 'sigmoid'", "'relu'")),
    ("route_scale-zero", dict(route_scale=0.0), "MoEConfig.route_scale", ("> 0", "got 0.0")),
    ("route_scale-nan", dict(route_scale=float("nan")), "MoEConfig.route_scale", ("> 0", "nan")),
    ("groups-only", dict(num_expert_groups=4), "num_limited_groups", ("both set or both None", "num_limited_groups=None")),
    ("limited-only", dict(num_limited_groups=2), "num_expert_groups", ("both set or both None", "num_expert_groups=None")),
    ("groups-zero", dict(num_expert_groups=0, num_limited_groups=1), "num_expert_groups", ("positive", "0/1")),
    ("limited-negative", dict(num_expert_groups=4, num_limited_groups=-1), "num_limited_groups", ("positive", "4/-1")),
    ("groups-not-dividing", dict(num_expert_groups=3, num_limited_groups=1), "MoEConfig.num_expert_groups",
     ("divisor of num_experts=8", "got 3")),
    ("group-of-one", dict(num_expert_groups=8, num_limited_groups=2), "MoEConfig.num_expert_groups",
     ("at least 2 experts per group", "got 1")),
    ("limited-gt-groups", dict(num_expert_groups=2, num_limited_groups=3), "MoEConfig.num_limited_groups",
     ("<= num_expert_groups=2", "got 3")),
    ("kept-groups-too-small", dict(num_expert_groups=4, num_limited_groups=1, top_k=3),
     "MoEConfig.num_limited_groups", ("at least top_k=3 experts", "1 kept groups x 2 experts = 2")),
    ("load_balance_coeff", dict(load_balance_coeff=0.0), "MoEConfig.load_balance_coeff", ("> 0 or None", "got 0.0")),
    ("param_dtype", dict(param_dtype=torch.int32), "MoEConfig.param_dtype", ("torch.int32", "floating dtype")),
    ("expert_dtype", dict(expert_dtype=torch.int8), "MoEConfig.expert_dtype", ("torch.int8", "floating dtype")),
    ("padding", dict(padding="truncate"), "MoEConfig.padding", ("'pad', 'error' or None", "'truncate'")),
    ("dispatcher", dict(dispatcher="nccl"), "MoEConfig.dispatcher", ("'all_gather'", "'nccl'")),
]


@pytest.mark.parametrize("overrides, field, fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_config_raises(overrides: dict[str, Any], field: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as exc:
        MoEConfig(**{**BASE, **overrides})
    assert_config_error(exc, field, *fragments)


def test_replace_revalidates() -> None:
    cfg = MoEConfig(**BASE)
    with pytest.raises(ConfigError, match="top_k <= num_experts"):
        dataclasses.replace(cfg, top_k=100)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(top_k=8),  # top_k == num_experts
        dict(num_expert_groups=4, num_limited_groups=1, top_k=2),  # kept groups hold exactly top_k
        dict(num_expert_groups=4, num_limited_groups=4),  # keep every group
        dict(score_func="sigmoid", route_scale=2.5, load_balance_coeff=1e-3, shared_hidden_dim=12,
             param_dtype=torch.bfloat16, expert_dtype=torch.bfloat16, padding="error", dispatcher="all_gather"),
    ],
    ids=["top_k-eq-experts", "kept-groups-exact", "all-groups", "everything-else"],
)
def test_boundary_configs_are_accepted(overrides: dict[str, Any]) -> None:
    cfg = MoEConfig(**{**BASE, **overrides})
    for k, v in overrides.items():
        assert getattr(cfg, k) == v


def test_check_ep_experts_not_divisible() -> None:
    cfg = MoEConfig(**BASE)
    cfg.check_ep(1), cfg.check_ep(2), cfg.check_ep(4), cfg.check_ep(8)
    with pytest.raises(ConfigError) as exc:
        cfg.check_ep(3)
    assert_config_error(exc, "MoEConfig.num_experts", "divisible by the EP size 3", "got 8", "1, 2, 4, 8")


def test_check_ep_shared_hidden_not_divisible() -> None:
    cfg = MoEConfig(**{**BASE, "shared_hidden_dim": 6})
    cfg.check_ep(2)
    with pytest.raises(ConfigError) as exc:
        cfg.check_ep(4)
    assert_config_error(exc, "MoEConfig.shared_hidden_dim", "divisible by the TP size 4", "got 6")


class _Size3(ParallelContext):
    """A context that only reports size 3: MoE must reject it before touching a group."""

    @property
    def size(self) -> int:
        return 3


def test_moe_rejects_ep_size_not_dividing_experts() -> None:
    with pytest.raises(ConfigError) as exc:
        MoE(MoEConfig(**BASE), _Size3())
    assert_config_error(exc, "MoEConfig.num_experts", "EP size 3")


def test_moe_rejects_unknown_layout() -> None:
    with pytest.raises(ConfigError) as exc:
        MoE(MoEConfig(**BASE), layout="columnwise")  # type: ignore[arg-type]
    assert_config_error(exc, "MoE layout", "'replicated', 'invariant' or 'sequence'", "'columnwise'")


def test_padding_defaults_to_not_told() -> None:
    """No silent padding policy: None until the user chooses 'pad' or 'error'."""
    assert MoEConfig(**BASE).padding is None
    assert MoEConfig(**{**BASE, "padding": "pad"}).padding == "pad"
