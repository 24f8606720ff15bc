"""The bad-input catalogue of docs/errors.md: one test per row.

Each test asserts the SpmdMoeError subclass and a distinctive part of the message (or,
where the input is accepted, the documented correct result). Cases that need real ranks
run in ONE spawned 2-rank gloo group (fixture ``ep2``): every rank records each case's
outcome, and a per-case test reads both ranks' records. Faults that break the group
(a rank that dies or never joins) are in test_faults.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import spmd_moe as sm
from spmd_moe.checkpoint import EXPERT_KEYS, shard_state_dict
from spmd_moe.config import MoEConfig
from spmd_moe.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    DistributedError,
    DtypeError,
    PaddingError,
    RoutingError,
    ShapeError,
    SpmdMoeError,
)
from spmd_moe.moe import MoE
from spmd_moe.parallel import ParallelContext

from dist_utils import run_distributed

BASE: dict[str, Any] = dict(dim=8, hidden_dim=8, num_experts=4, top_k=2)


def _cfg(**kw: Any) -> MoEConfig:
    return MoEConfig(**{**BASE, **kw})


def _layer(name: str = "moe", **kw: Any) -> MoE:
    m = MoE(_cfg(**kw), name=name)
    m.init_states(0)
    return m


def _x(T: int = 6, D: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def check(exc: BaseException, cls: type[SpmdMoeError], *fragments: str) -> None:
    """Class, base class and message fragments (every message says expected ... Fix)."""
    assert isinstance(exc, cls) and isinstance(exc, SpmdMoeError), repr(exc)
    msg = str(exc)
    for part in ("expected", "Fix", *fragments):
        assert part in msg, f"{part!r} not in: {msg}"


# ============================================================================ config


CONFIG_CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("top_k_gt_experts", dict(top_k=5), ("MoEConfig.top_k", "top_k <= num_experts=4", "got 5")),
    ("groups_not_dividing", dict(num_experts=6, num_expert_groups=4, num_limited_groups=1),
     ("MoEConfig.num_expert_groups", "divisor of num_experts=6", "got 4")),
    ("limited_gt_groups", dict(num_experts=8, num_expert_groups=2, num_limited_groups=3),
     ("MoEConfig.num_limited_groups", "<= num_expert_groups=2", "got 3")),
    ("groups_half_set", dict(num_expert_groups=2), ("num_limited_groups", "both set or both")),
    ("group_of_one", dict(num_expert_groups=4, num_limited_groups=2, top_k=1), ("at least 2 experts per group",)),
    ("kept_groups_lt_top_k", dict(num_experts=8, num_expert_groups=4, num_limited_groups=1, top_k=3),
     ("num_limited_groups", "top_k=3", "got 1 kept groups")),
    ("dim_zero", dict(dim=0), ("MoEConfig.dim", "positive int", "got 0")),
    ("hidden_negative", dict(hidden_dim=-3), ("MoEConfig.hidden_dim", "got -3")),
    ("experts_zero", dict(num_experts=0, top_k=1), ("MoEConfig.num_experts", "got 0")),
    ("top_k_negative", dict(top_k=-1), ("MoEConfig.top_k", "got -1")),
    ("size_float", dict(dim=8.0), ("MoEConfig.dim", "got 8.0")),
    ("shared_zero", dict(shared_hidden_dim=0), ("MoEConfig.shared_hidden_dim", "got 0")),
    ("unknown_score_func", dict(score_func="tanh"), ("MoEConfig.score_func", "'tanh'")),
    ("route_scale_nan", dict(route_scale=float("nan")), ("MoEConfig.route_scale", "got nan")),
    ("balance_coeff_negative", dict(load_balance_coeff=-0.1), ("MoEConfig.load_balance_coeff", "got -0.1")),
    ("param_dtype_int", dict(param_dtype=torch.int32), ("MoEConfig.param_dtype", "torch.int32")),
    ("unknown_padding", dict(padding="truncate"), ("MoEConfig.padding", "'truncate'")),
    ("unknown_dispatcher", dict(dispatcher="nccl"), ("MoEConfig.dispatcher", "'nccl'")),
]


@pytest.mark.parametrize("overrides,fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_invalid(overrides: dict[str, Any], fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(**overrides)
    check(e.value, ConfigError, *fragments)


def test_config_experts_not_divisible_by_ep() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(num_experts=6).check_ep(4)
    check(e.value, ConfigError, "MoEConfig.num_experts", "divisible by the EP size 4", "got 6", "1, 2, 3, 6")


def test_config_shared_hidden_not_divisible_by_tp() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(shared_hidden_dim=6).check_ep(4)
    check(e.value, ConfigError, "MoEConfig.shared_hidden_dim", "TP size 4", "got 6")


def test_config_unknown_layout() -> None:
    with pytest.raises(ConfigError) as e:
        MoE(_cfg(), layout="rowwise")  # type: ignore[arg-type]
    check(e.value, ConfigError, "MoE layout", "'rowwise'")


# ============================================================================ tensors


def test_input_integer_dtype() -> None:
    with pytest.raises(DtypeError) as e:
        _layer()(torch.ones(4, 8, dtype=torch.int64))
    check(e.value, DtypeError, "moe: x_TD", "floating dtype", "torch.int64", "token ids")


def test_input_not_a_tensor() -> None:
    with pytest.raises(DtypeError) as e:
        _layer()([[0.0] * 8] * 2)  # type: ignore[arg-type]
    check(e.value, DtypeError, "x_TD", "torch.Tensor", "list")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_input_other_float_dtype_is_accepted(dtype: torch.dtype) -> None:
    """Documented: a float input of another dtype runs the experts in that dtype
    (MoEConfig.expert_dtype=None) and returns that dtype; router math is fp32."""
    m, x = _layer(), _x(32)
    y = m(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == torch.float64:  # against the fp32 run: fp32 rounding only (default fp32 tolerances)
        torch.testing.assert_close(y.float(), m(x))
    else:  # bf16 keeps 8 mantissa bits; each of ~5 roundings in a row adds <= 2**-8 relative
        scale = float(m(x).detach().abs().max())
        torch.testing.assert_close(y.float(), m(x), atol=2e-2 * scale, rtol=2**-5)


@pytest.mark.parametrize("shape", [(2, 3, 8), (8,)], ids=["rank3", "rank1"])
def test_input_wrong_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError) as e:
        _layer()(torch.randn(*shape))
    check(e.value, ShapeError, "x_TD", "[T, D=8]", str(tuple(shape)), "reshape(-1, D)")


def test_input_wrong_hidden_size() -> None:
    with pytest.raises(ShapeError) as e:
        _layer()(torch.randn(4, 7))
    check(e.value, ShapeError, "x_TD", "[T, D=8]", "(4, 7)", "MoEConfig.dim")


def test_input_on_meta_device() -> None:
    with pytest.raises(DeviceError) as e:
        _layer()(torch.empty(4, 8, device="meta"))
    check(e.value, DeviceError, "x_TD", "real tensor", "meta device")


def test_layer_on_meta_device() -> None:
    m = MoE(_cfg(), device="meta")
    with pytest.raises(DeviceError) as e:
        m(_x())
    check(e.value, DeviceError, "parameters", "materialized weights", "meta tensors", "to_empty")


def test_layer_on_meta_then_materialized_runs() -> None:
    """The fix the DeviceError names works: to_empty + init_states == a CPU-built layer."""
    m = MoE(_cfg(), device="meta")
    m.to_empty(device="cpu")
    m.init_states(0)
    assert torch.equal(m(_x()), _layer()(_x()))


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that reports cuda:0: simulates an input on another real device
    (this CPU-only suite cannot build one)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def test_input_on_other_device() -> None:
    x = torch.Tensor._make_subclass(_ReportsCuda, _x())
    assert x.device.type == "cuda" and not x.is_meta
    with pytest.raises(DeviceError) as e:
        _layer()(x)
    check(e.value, DeviceError, "moe: x_TD", "expected device cpu (the layer's)", "got cuda:0", "x_TD.to('cpu')")


@pytest.mark.parametrize("kind", ["transposed", "strided", "expanded"])
def test_input_non_contiguous_is_accepted(kind: str) -> None:
    """Documented: non-contiguous inputs are accepted; output and input gradient are
    bitwise those of the contiguous copy. The guarantee is the layer's: MoE.forward makes
    its input contiguous first, so the same kernels run on the same memory layout (a bare
    F.linear on a column-major input does differ in the last bits on some CPUs)."""
    views = {
        "transposed": lambda b: b[:, :8].t().contiguous().t(),  # column-major [16, 8]
        "strided": lambda b: b[:, ::3],  # row stride 24, column stride 3
        "expanded": lambda b: b[:1, :8].expand(16, 8),  # stride-0 rows
    }
    m = _layer()
    leaf_a = _x(16, 24).requires_grad_(True)
    leaf_b = _x(16, 24).requires_grad_(True)
    xa = views[kind](leaf_a)
    assert not xa.is_contiguous()
    ya, yb = m(xa), m(views[kind](leaf_b).contiguous())
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    assert torch.equal(ya, yb)
    assert leaf_a.grad is not None and leaf_b.grad is not None
    assert float(leaf_a.grad.abs().max()) > 0
    assert torch.equal(leaf_a.grad, leaf_b.grad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_router_input_nonfinite_debug(bad: float) -> None:
    m = _layer(name="layers.3.moe")
    x = _x()
    x[2, 5] = bad
    with sm.debug(), pytest.raises(RoutingError) as e:
        m(x)
    check(e.value, RoutingError, "layers.3.moe.router", "finite values", "NaN/inf in 1 of 6 tokens")


def test_router_input_nan_debug_off_documented() -> None:
    """Documented (debug off): no check; the NaN token's output row is all NaN, the
    other tokens' outputs are unaffected (equal to a run without that token)."""
    m, x = _layer(), _x(12)
    xn = x.clone()
    xn[4, 0] = float("nan")
    y = m(xn)
    assert torch.isnan(y[4]).all()
    keep = [t for t in range(12) if t != 4]
    # Other tokens: same rows, but experts may see a different row count (blocking).
    torch.testing.assert_close(y[keep], m(x[keep]), atol=1e-7, rtol=1e-6)


FORCED: list[tuple[str, Any, tuple[str, ...]]] = [
    ("out_of_range", lambda T: torch.full((T, 2), 4), ("expert ids in [0, 4)", "[4, 4]")),
    ("negative", lambda T: torch.tensor([[0, -1]] * T), ("expert ids in [0, 4)", "[-1, 0]")),
    ("wrong_shape", lambda T: torch.zeros(T - 1, 2, dtype=torch.int64), ("shape (6, 2)", "(5, 2)")),
    ("wrong_k", lambda T: torch.zeros(T, 3, dtype=torch.int64), ("shape (6, 2)", "(6, 3)")),
    ("float_ids", lambda T: torch.zeros(T, 2), ("integer tensor", "torch.float32")),
    ("duplicate_ids", lambda T: torch.tensor([[0, 1]] * (T - 1) + [[3, 3]]), ("2 distinct", "[3, 3] for token 5")),
]


@pytest.mark.parametrize("make,fragments", [c[1:] for c in FORCED], ids=[c[0] for c in FORCED])
def test_forced_routes_invalid(make: Any, fragments: tuple[str, ...]) -> None:
    m = _layer()
    m.forced_routes_TK = make(6)
    with pytest.raises(RoutingError) as e:
        m(_x(6))
    check(e.value, RoutingError, "moe: forced_routes_TK", *fragments)


def test_forced_routes_valid_replay() -> None:
    """Recorded routes forced back reproduce the output bitwise.

    Guaranteed: routes are recorded in the router's k order, and the forced path gathers
    the same scores and normalizes them in that order (any top_k; test_routing_replay
    checks top_k 3 and 8); see docs/architecture.md, "Bitwise claims"."""
    m, x = _layer(), _x(10)
    m.record_routes = True
    y = m(x)
    m.record_routes = False
    m.forced_routes_TK = m.recorded_routes[0]
    assert torch.equal(m(x), y)


# ============================================================================ token counts


def test_tokens_zero_single_rank() -> None:
    m = _layer()
    x = torch.zeros(0, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 8)
    assert m.experts.w1_EFD.grad is not None and not m.experts.w1_EFD.grad.any()


def test_tokens_fewer_than_experts_single_rank() -> None:
    """T=1 with E=4: three experts get no rows; the output is the reference's."""
    from reference import reference_moe

    m, x = _layer(), _x(1)
    torch.testing.assert_close(m(x).double(), reference_moe(m.cfg, m.state_dict(), x), atol=1e-7, rtol=1e-5)


# ============================================================================ checkpoints


def _full_sd() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _layer().state_dict().items()}


def test_checkpoint_missing_expert_weights() -> None:
    sd = _full_sd()
    del sd[EXPERT_KEYS[1]]
    with pytest.raises(CheckpointError) as e:
        shard_state_dict(sd, _cfg(), ParallelContext.single())
    check(e.value, CheckpointError, f"'{EXPERT_KEYS[1]}'", "missing", "expected shape (4, 8, 8)")


def test_checkpoint_unexpected_key() -> None:
    sd = _full_sd()
    sd["routed_experts.inner_experts.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointError) as e:
        shard_state_dict(sd, _cfg(), ParallelContext.single())
    check(e.value, CheckpointError, "'routed_experts.inner_experts.bias'", "unexpected", "expected keys")


def test_checkpoint_wrong_shape() -> None:
    sd = _full_sd()
    sd[EXPERT_KEYS[0]] = torch.zeros(4, 16, 8)
    with pytest.raises(CheckpointError) as e:
        shard_state_dict(sd, _cfg(), ParallelContext.single())
    check(e.value, CheckpointError, f"'{EXPERT_KEYS[0]}'", "expected shape (4, 8, 8)", "(4, 16, 8)", "hidden_dim")


def test_checkpoint_prefixed_missing_key_named_with_prefix() -> None:
    sd = {f"layers.0.moe.{k}": v for k, v in _full_sd().items() if k != "router.gate.weight"}
    with pytest.raises(CheckpointError) as e:
        shard_state_dict(sd, _cfg(), ParallelContext.single(), prefix="layers.0.moe.")
    check(e.value, CheckpointError, "'layers.0.moe.router.gate.weight'", "missing")


def test_load_state_dict_missing_key() -> None:
    sd = _full_sd()
    del sd[EXPERT_KEYS[2]]
    with pytest.raises(CheckpointError) as e:
        _layer().load_state_dict(sd)
    check(e.value, CheckpointError, f"moe: state dict key '{EXPERT_KEYS[2]}'", "missing", "(4, 8, 8)")


def test_load_state_dict_unexpected_key() -> None:
    sd = {**_full_sd(), "gate.weight": torch.zeros(4, 8)}
    with pytest.raises(CheckpointError) as e:
        _layer().load_state_dict(sd)
    check(e.value, CheckpointError, "'gate.weight'", "unexpected", "prefix")


def test_load_state_dict_wrong_shape() -> None:
    sd = _full_sd()
    sd["router.gate.weight"] = torch.zeros(5, 8)
    with pytest.raises(CheckpointError) as e:
        _layer().load_state_dict(sd)
    check(e.value, CheckpointError, "'router.gate.weight'", "expected shape (4, 8)", "(5, 8)")


def test_load_state_dict_wrong_shape_even_non_strict() -> None:
    sd = _full_sd()
    del sd[EXPERT_KEYS[0]]
    sd[EXPERT_KEYS[1]] = torch.zeros(2, 8, 8)
    with pytest.raises(CheckpointError) as e:
        _layer().load_state_dict(sd, strict=False)
    check(e.value, CheckpointError, f"'{EXPERT_KEYS[1]}'", "(4, 8, 8)", "(2, 8, 8)")


def test_checkpoint_error_message_is_readable() -> None:
    """CheckpointError is a KeyError, whose str() would be the repr (quoted, escaped)."""
    e = CheckpointError("key 'a': missing")
    assert isinstance(e, KeyError) and str(e) == "key 'a': missing"


# ============================================================================ 2 ranks (gloo)


def _ep2_catalogue(rank: int, world: int) -> dict[str, tuple[str, str]]:
    """Every 2-rank case on one gloo group: case -> (outcome class name, message/result)."""
    import torch.distributed as dist

    pctx = ParallelContext.from_group(dist.group.WORLD)
    out: dict[str, tuple[str, str]] = {}

    def case(name: str, fn: Any) -> None:
        try:
            out[name] = ("ok", repr(fn()))
        except Exception as e:  # noqa: BLE001 - recorded, asserted by the tests
            out[name] = (type(e).__name__, str(e))

    def layer(layout: str = "replicated", **kw: Any) -> MoE:
        m = MoE(_cfg(**kw), pctx, layout=layout)
        m.init_states(0)
        return m

    x = _x(64)
    ref = _layer()

    def same_as_ep1(y: torch.Tensor, y_ref: torch.Tensor) -> str:
        # EP1 and EP2 may block the fp32 GEMMs differently: 1 ulp-level tolerance.
        torch.testing.assert_close(y, y_ref, atol=1e-7, rtol=1e-6)
        return f"shape={tuple(y.shape)} equal-to-ep1"

    # Construction: a group whose size does not divide the experts (no communication).
    case("group_size_vs_experts", lambda: MoE(_cfg(num_experts=3, top_k=1), pctx))
    case("group_size_vs_shared", lambda: MoE(_cfg(shared_hidden_dim=5), pctx))
    rep, seq = layer(padding="pad"), layer("sequence", padding="pad")
    # Ranks that disagree: every rank raises the same DistributedError; the group stays usable.
    case("disagree_T_replicated", lambda: rep(x[: 8 if rank == 0 else 6]))
    case("disagree_top_k", lambda: layer(top_k=1 + rank)(x[:8]))
    case("disagree_config_field", lambda: layer(route_norm=bool(rank))(x[:8]))
    case("disagree_layout", lambda: (rep if rank == 0 else seq)(x[:8]))
    # Unequal slices on the all-gather paths are padded under 'pad'; 'error' refuses on every rank.
    case("disagree_T_sequence_all_gather", lambda: layer("sequence", dispatcher="all_gather", padding="error")(x[: 3 + rank]))
    case("usable_after_disagreement", lambda: same_as_ep1(rep(x[:8]), ref(x[:8])))
    # Padding policy 'error': raised on every rank before any exchange.
    case("uneven_T_padding_error", lambda: layer(padding="error")(x[:5]))
    # Token counts.
    for T in (0, 1, 5, 40):
        case(f"replicated_T{T}", lambda T=T: same_as_ep1(rep(x[:T]), ref(x[:T])))
    for a, b in ((0, 0), (0, 5), (3, 7), (30, 2)):
        def seq_case(a: int = a, b: int = b) -> str:
            y = seq(x[:a] if rank == 0 else x[a : a + b])
            y_ref = ref(x[: a + b])
            return same_as_ep1(y, y_ref[:a] if rank == 0 else y_ref[a:])
        case(f"sequence_T{a}_{b}", seq_case)
    # T=0 on every rank, forward and backward, both layouts.
    def zero_bwd(m: MoE) -> str:
        x0 = torch.zeros(0, 8, requires_grad=True)
        y = m(x0)
        y.sum().backward()
        assert x0.grad is not None and x0.grad.shape == (0, 8)
        return f"shape={tuple(y.shape)} backward-ok"
    case("zero_everywhere_backward_replicated", lambda: zero_bwd(layer()))
    case("zero_everywhere_backward_sequence", lambda: zero_bwd(layer("sequence")))
    # NaN in the router input of one rank only (debug): every rank raises together.
    def nan_on_rank1(layout: str) -> Any:
        xn = x[:8].clone()
        if rank == 1:
            xn[3, 0] = float("nan")
        m = layer(layout)
        with sm.debug():
            return m(xn)
    case("nan_one_rank_sequence_debug", lambda: nan_on_rank1("sequence"))
    # Layout 'replicated' with a NaN token in rank 1's half only: still both raise.
    def nan_replicated() -> Any:
        xn = x[:8].clone()
        xn[6, 0] = float("nan")
        m = layer()
        with sm.debug():
            return m(xn)
    case("nan_replicated_debug", nan_replicated)
    # A full (unsharded) checkpoint loaded on one rank of the group.
    case("full_checkpoint_on_ep_rank", lambda: layer().load_state_dict(ref.state_dict()))
    def sharded_load() -> str:
        m = layer()
        m.load_state_dict(shard_state_dict(ref.state_dict(), _cfg(), pctx))
        return same_as_ep1(m(x[:8]), ref(x[:8]))
    case("sharded_checkpoint_on_ep_rank", sharded_load)
    return out


@pytest.fixture(scope="module")
def ep2() -> list[dict[str, tuple[str, str]]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_distributed(_ep2_catalogue, 2, timeout=150, pg_timeout=20)


def _both(ep2: list[dict[str, tuple[str, str]]], name: str, cls: type[Exception] | str, *fragments: str) -> None:
    want = cls if isinstance(cls, str) else cls.__name__
    for rank, res in enumerate(ep2):
        kind, msg = res[name]
        assert kind == want, f"rank {rank} {name}: expected {want}, got {kind}: {msg}"
        parts = fragments if kind == "ok" else ("expected", "Fix", *fragments)
        for part in parts:
            assert part in msg, f"rank {rank} {name}: {part!r} not in: {msg}"


def test_ep2_group_size_not_matching_experts(ep2: Any) -> None:
    _both(ep2, "group_size_vs_experts", ConfigError, "MoEConfig.num_experts", "EP size 2", "got 3")


def test_ep2_group_size_not_matching_shared(ep2: Any) -> None:
    _both(ep2, "group_size_vs_shared", ConfigError, "MoEConfig.shared_hidden_dim", "TP size 2", "got 5")


def test_ep2_ranks_disagree_on_T(ep2: Any) -> None:
    _both(ep2, "disagree_T_replicated", DistributedError, "ranks disagree on 'token_convention'",
          "rank 0's 8", "got 6 on rank 1", "equal T on all ranks")


def test_ep2_ranks_disagree_on_top_k(ep2: Any) -> None:
    _both(ep2, "disagree_top_k", DistributedError, "ranks disagree on 'top_k'", "rank 0's 1", "got 2 on rank 1")


def test_ep2_ranks_disagree_on_config_field(ep2: Any) -> None:
    _both(ep2, "disagree_config_field", DistributedError, "ranks disagree on 'config_hash'", "same MoEConfig")


def test_ep2_ranks_disagree_on_layout(ep2: Any) -> None:
    _both(ep2, "disagree_layout", DistributedError, "ranks disagree on 'layout'", "rank 0's 'replicated'",
          "got 'sequence' on rank 1")


def test_ep2_ranks_disagree_on_T_decode_sequence(ep2: Any) -> None:
    _both(ep2, "disagree_T_sequence_all_gather", PaddingError, "per-rank token counts [3, 4]",
          "equal per-rank token counts", "pad every rank's slice to 4 rows", "padding='pad'")


def test_ep2_group_usable_after_disagreement(ep2: Any) -> None:
    _both(ep2, "usable_after_disagreement", "ok", "equal-to-ep1")


def test_ep2_uneven_T_padding_error(ep2: Any) -> None:
    _both(ep2, "uneven_T_padding_error", PaddingError, "T=5", "multiple of the axis size n=2",
          "remainder 1", "T=6", "padding='pad'")


@pytest.mark.parametrize("T", [0, 1, 5, 40], ids=["zero_everywhere", "T_lt_ep_size", "uneven", "even"])
def test_ep2_replicated_token_counts(ep2: Any, T: int) -> None:
    _both(ep2, f"replicated_T{T}", "ok", f"shape=({T}, 8)", "equal-to-ep1")


@pytest.mark.parametrize("a,b", [(0, 0), (0, 5), (3, 7), (30, 2)],
                         ids=["zero_everywhere", "zero_on_one_rank", "uneven", "skewed"])
def test_ep2_sequence_token_counts(ep2: Any, a: int, b: int) -> None:
    for rank, res in enumerate(ep2):
        kind, msg = res[f"sequence_T{a}_{b}"]
        assert kind == "ok" and f"shape=({a if rank == 0 else b}, 8)" in msg and "equal-to-ep1" in msg, msg


@pytest.mark.parametrize("layout", ["replicated", "sequence"])
def test_ep2_zero_tokens_backward(ep2: Any, layout: str) -> None:
    _both(ep2, f"zero_everywhere_backward_{layout}", "ok", "shape=(0, 8)", "backward-ok")


def test_ep2_nan_on_one_rank_debug(ep2: Any) -> None:
    """Only rank 1 has NaN, yet both raise (no rank is left waiting in a collective)."""
    _both(ep2, "nan_one_rank_sequence_debug", RoutingError, "moe.router", "finite values on every rank",
          "[1] tokens on ranks [1]")


def test_ep2_full_checkpoint_on_ep_rank(ep2: Any) -> None:
    _both(ep2, "full_checkpoint_on_ep_rank", CheckpointError, "'routed_experts.inner_experts.w1_EFD'",
          "expected shape (2, 8, 8)", "got (4, 8, 8)", "shard_state_dict")


def test_ep2_nan_replicated_debug(ep2: Any) -> None:
    _both(ep2, "nan_replicated_debug", RoutingError, "moe.router", "[1, 1] tokens on ranks [0, 1]")


def test_ep2_sharded_checkpoint_loads(ep2: Any) -> None:
    _both(ep2, "sharded_checkpoint_on_ep_rank", "ok", "equal-to-ep1")


# ============================================================================ the catalogue


def test_catalogue_cites_existing_tests() -> None:
    """docs/errors.md: >= 30 numbered cases, and every test it cites exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent
    doc = (root.parent / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| (\d+) \|", doc, flags=re.M)
    assert len(rows) >= 30 and rows == [str(i) for i in range(1, len(rows) + 1)], rows
    cited = re.findall(r"`(test_\w+\.py)::(test_\w+)(?:\[([^\]]*)\])?`", doc)
    assert len(cited) >= 30
    for fname, func, param in cited:
        src = (root / fname).read_text()
        assert f"def {func}(" in src, f"docs/errors.md cites {fname}::{func}, which does not exist"
        assert param in src, f"docs/errors.md cites {fname}::{func}[{param}]: no such parameter id"
