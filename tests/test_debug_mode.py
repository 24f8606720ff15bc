"""Debug mode catches wrong shapes, dtypes and placements, with messages that say the fix;
off, it checks nothing; on, a correct layer raises nothing (no false positives) and
computes the same bits (training forward+backward and inference_mode forward).

Placement cases run on a real 2-rank gloo group (tests/dist_utils.py); one spawn
covers all cases of a kind, the tests then assert on what each rank returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from jaxtyping import Float

import spmd_moe as sm
import spmd_moe.placement
from spmd_moe.dispatch import LocalDispatcher
from spmd_moe.errors import DtypeError, PlacementError, ShapeError, SpmdMoeError
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP, Placed, Var
from tests.dist_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bad_dispatch_args(kind: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(12, 8, generator=g)
    ids_TK = torch.randint(0, 4, (12, 2), generator=g)
    if kind == "shape":  # 10 tokens of ids for 12 tokens of x: T disagrees
        return x_TD, ids_TK[:10], 0
    if kind == "rank":  # [B, T, D] not flattened
        return x_TD[None], ids_TK, 0
    assert kind == "dtype"  # float expert ids
    return x_TD, ids_TK.float(), 0


# ----------------------------------------------------------------- shape / dtype (1 rank)


def test_wrong_shape_names_param_expected_actual_fix() -> None:
    d = LocalDispatcher(4, ParallelContext.single())
    with sm.debug(), pytest.raises(ShapeError) as ei:
        d.dispatch(*_bad_dispatch_args("shape"))
    msg = str(ei.value)
    assert "LocalDispatcher.dispatch" in msg and "parameter 'expert_ids_TK'" in msg
    assert "expected shape [T, K] with T=12" in msg and "got [10, 2]" in msg
    assert "Fix:" in msg


def test_unflattened_input_is_a_shape_error() -> None:
    d = LocalDispatcher(4, ParallelContext.single())
    with sm.debug(), pytest.raises(ShapeError) as ei:
        d.dispatch(*_bad_dispatch_args("rank"))
    msg = str(ei.value)
    assert "parameter 'x_TD'" in msg and "expected shape [T, D]" in msg and "got [1, 12, 8]" in msg
    assert "flatten batch and sequence" in msg


def test_wrong_dtype_names_param_expected_actual_fix() -> None:
    d = LocalDispatcher(4, ParallelContext.single())
    with sm.debug(), pytest.raises(DtypeError) as ei:
        d.dispatch(*_bad_dispatch_args("dtype"))
    msg = str(ei.value)
    assert "parameter 'expert_ids_TK'" in msg and "expected dtype Int" in msg and "int64" in msg
    assert "got float32" in msg and "Fix: pass integer expert ids" in msg


def test_debug_off_does_not_check_shapes_or_dtypes() -> None:
    d = LocalDispatcher(4, ParallelContext.single())
    with sm.debug(False):
        # Shape disagreement: silently accepted (this is what debug mode is for).
        d.dispatch(*_bad_dispatch_args("shape"))
        # Float ids: torch fails later with its own message, not an SpmdMoeError.
        with pytest.raises(Exception) as ei:
            d.dispatch(*_bad_dispatch_args("dtype"))
    assert not isinstance(ei.value, SpmdMoeError)


_ENV_SNIPPET = """
import torch, spmd_moe as sm
from spmd_moe.dispatch import LocalDispatcher
from spmd_moe.parallel import ParallelContext
from tests.test_debug_mode import _bad_dispatch_args
d = LocalDispatcher(4, ParallelContext.single())
print("debug", sm.is_debug())
for kind in ("shape", "dtype"):
    try:
        d.dispatch(*_bad_dispatch_args(kind))
        print(kind, "passed")
    except sm.SpmdMoeError as e:
        print(kind, type(e).__name__)
    except Exception:
        print(kind, "torch's own error")
"""


@pytest.mark.parametrize("env, expect", [("1", ("ShapeError", "DtypeError")), ("0", ("passed", "torch's own error"))])
def test_env_var_switch(env: str, expect: tuple[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _ENV_SNIPPET], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "SPMD_MOE_DEBUG": env, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == f"debug {env == '1'}"
    assert lines[1] == f"shape {expect[0]}" and lines[2] == f"dtype {expect[1]}"


# ----------------------------------------------------------------- placements (2 ranks)


def _moe(layout: str = "replicated", dispatcher: str = "auto") -> sm.MoE:
    import torch.distributed as dist

    cfg = sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, shared_hidden_dim=8, padding="pad",
                       load_balance_coeff=1e-3, dispatcher=dispatcher)  # type: ignore[arg-type]
    moe = sm.MoE(cfg, ParallelContext.from_group(dist.group.WORLD, "ep"), layout=layout)  # type: ignore[arg-type]
    moe.init_states(seed=0)
    with torch.no_grad():  # a nonzero bias so the bias path does something
        moe.expert_bias_E.copy_(torch.linspace(-0.01, 0.01, 4))  # type: ignore[union-attr]
    return moe


def _catch(fn: Any) -> dict[str, Any]:
    try:
        out = fn()
        return {"raised": None, "shape": tuple(out.shape) if isinstance(out, torch.Tensor) else None}
    except Exception as e:  # noqa: BLE001 - the test inspects it
        cause = e.__cause__
        return {"raised": type(e).__name__, "msg": str(e), "cause": type(cause).__name__ if cause else None}


def _placement_cases(rank: int, world: int) -> dict[str, dict[str, Any]]:
    import spmd_types as spmd
    import torch.distributed as dist
    import torch.nn.functional as F

    g = dist.group.WORLD
    torch.manual_seed(0)  # same x on both ranks: a legitimate Replicate input
    res: dict[str, dict[str, Any]] = {}

    def par_x() -> torch.Tensor:
        x = torch.randn(8, 16)
        spmd.assert_type(x, {g: spmd.P})
        return x

    moe = _moe()
    for on in (True, False):
        with sm.debug(on):
            res[f"layer_gets_P_{on}"] = _catch(lambda: moe.forward_replicated(par_x()))  # type: ignore[arg-type]
            x_rep = torch.randn(8, 16)
            spmd.assert_type(x_rep, {g: spmd.R})
            res[f"router_gets_R_{on}"] = _catch(lambda: moe.router(x_rep))

    # A Partial gate weight: the logits are Partial and reach softmax (non-linear).
    for on in (True, False):
        moe = _moe()
        spmd.assert_type(moe.router.gate.weight, {g: spmd.P})
        with sm.debug(on):
            res[f"partial_gate_{on}"] = _catch(lambda: moe(torch.randn(8, 16)))

    # The shared expert's output is Partial: applying silu before reduce_scatter is the bug.
    # (the layer's tracked region, which the MoE forward enters, around user code)
    moe = _moe()

    def user_code() -> torch.Tensor:
        with sm.debug(), moe._typecheck():
            x = torch.randn(8, 16)
            spmd.assert_type(x, {g: spmd.R})
            return F.silu(moe.shared_experts(x))

    res["silu_of_partial"] = _catch(user_code)
    return res


@pytest.fixture(scope="module")
def placement_cases() -> list[dict[str, dict[str, Any]]]:
    return run_distributed(_placement_cases, 2, timeout=180)


def test_wrong_placement_into_layer(placement_cases: list[dict[str, dict[str, Any]]]) -> None:
    for r in placement_cases:
        c = r["layer_gets_P_True"]
        assert c["raised"] == "PlacementError", c
        assert "MoE.forward_replicated(x_TD) on axis 'ep' (size 2)" in c["msg"]
        assert "expected placement R, got P" in c["msg"]
        assert "Fix: call spmd_moe.collectives.all_reduce(x, pctx) first" in c["msg"]


def test_replicated_tokens_into_router(placement_cases: list[dict[str, dict[str, Any]]]) -> None:
    for r in placement_cases:
        c = r["router_gets_R_True"]
        assert c["raised"] == "PlacementError", c
        assert "TopKRouter.forward(x_TD)" in c["msg"] and "expected placement V, got R" in c["msg"]
        assert "split_tokens" in c["msg"] and "pad T to a multiple" in c["msg"]


def test_partial_parameter_rejected_at_entry(placement_cases: list[dict[str, dict[str, Any]]]) -> None:
    # A gate weight marked Partial is rejected where the layer's region is entered
    # (before it could reach softmax), naming the parameter.
    for r in placement_cases:
        c = r["partial_gate_True"]
        assert c["raised"] == "PlacementError", c
        assert "moe: router.gate.weight on axis 'ep' (size 2): expected placement R, got P" in c["msg"]
        assert "Fix: call spmd_moe.collectives.all_reduce(x, pctx) first" in c["msg"]


def test_partial_into_nonlinear_op(placement_cases: list[dict[str, dict[str, Any]]]) -> None:
    for r in placement_cases:
        c = r["silu_of_partial"]
        assert c["raised"] == "PlacementError" and c["cause"] == "SpmdTypeError", c
        assert "moe on axis 'ep' (size 2): placement check failed" in c["msg"]
        assert "Partial type on axis" in c["msg"] and "non-linear" in c["msg"]
        assert "all_reduce" in c["msg"]  # spmd_types' fix suggestion is kept


def test_debug_off_does_not_check_placements(placement_cases: list[dict[str, dict[str, Any]]]) -> None:
    for r in placement_cases:
        assert r["layer_gets_P_False"] == {"raised": None, "shape": (8, 16)}
        assert r["router_gets_R_False"]["raised"] is None
        assert r["partial_gate_False"] == {"raised": None, "shape": (8, 16)}


# ----------------------------------------------------------------- no false positives


# (layout, T, dispatcher): T=11 needs padding on 2 and 4 ranks; both dispatchers.
_CASES = (("replicated", 11, "all_gather"), ("replicated", 40, "all_to_all"),
          ("invariant", 11, "all_gather"), ("invariant", 40, "all_to_all"),
          ("sequence", 12, "all_to_all"), ("sequence", 12, "all_gather"))


def _fwd_bwd(rank: int, world: int) -> dict[str, Any]:
    from spmd_moe.checking import checked_calls

    out: dict[str, Any] = {}
    for layout, T, dispatcher in _CASES:
        for on in (False, True):
            moe = _moe(layout, dispatcher)
            seed = 1 + rank if layout == "sequence" else 1  # sequence: each rank its own tokens
            x = torch.randn(T, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
            with sm.debug(on), checked_calls() as calls:
                y = moe(x)
                (y * y).sum().backward()
            grads = {k: p.grad.clone() for k, p in moe.named_parameters() if p.grad is not None}
            with torch.inference_mode(), sm.debug(on):  # vLLM's mode: raw collectives
                y_inf = moe(x.detach())
            out[f"{layout}{T}{dispatcher}_{on}"] = {
                "y": y.detach(), "gx": x.grad, "grads": grads, "calls": dict(calls), "y_inf": y_inf,
            }
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_forward_backward_debug_no_false_positives(world: int) -> None:
    for r in run_distributed(_fwd_bwd, world, timeout=400):
        for layout, T, dispatcher in _CASES:
            case = f"{layout}{T}{dispatcher}"
            off, on = r[f"{case}_False"], r[f"{case}_True"]
            # The checks ran on: router, experts, the dispatcher asked for, the layer...
            assert on["calls"].get("TopKRouter.forward") == 1, (case, on["calls"])
            assert on["calls"].get("GroupedExperts.forward") == 1
            kind = "AllGather" if dispatcher == "all_gather" else "AllToAll"
            assert on["calls"].get(f"{kind}Dispatcher.dispatch") == 1, (case, on["calls"])
            assert on["calls"].get(f"MoE.forward_{layout}") == 1
            assert off["calls"] == {}
            # ...and changed nothing: same outputs and gradients, bit for bit.
            assert torch.equal(on["y"], off["y"]), case
            assert torch.equal(on["gx"], off["gx"]), case
            assert torch.equal(on["y_inf"], off["y_inf"]), case
            assert on["grads"].keys() == off["grads"].keys() and len(on["grads"]) >= 6
            for k in on["grads"]:
                assert torch.equal(on["grads"][k], off["grads"][k]), (case, k)


# ----------------------------------------------------------------- results and non-tensors


class _Broken:
    """A @checked method whose result breaks its signature (a bug, not bad input)."""

    pctx = ParallelContext.single()

    @sm.checking.checked
    def narrow(self, x_TD: Float[Placed[Var[EP]], "T D"]) -> Float[Placed[Var[EP]], "T D"]:
        return x_TD[:, :1]  # type: ignore[return-value]

    @sm.checking.checked
    def as_int(self, x_TD: Float[Placed[Var[EP]], "T D"]) -> Float[Placed[Var[EP]], "T D"]:
        return x_TD.long()  # type: ignore[return-value]

    @sm.checking.checked
    def takes_int(self, x_TD: Float[Placed[Var[EP]], "T D"], k: int) -> Float[Placed[Var[EP]], "T D"]:
        return x_TD


def test_bad_result_is_reported_as_a_bug() -> None:
    x = torch.randn(3, 4)
    with sm.debug(), pytest.raises(ShapeError) as es:
        _Broken().narrow(x)
    assert "_Broken.narrow: return value" in str(es.value) and "expected shape [T, D] with T=3, D=4" in str(es.value)
    assert "got f32[3,1]" in str(es.value) and "report this message as a bug" in str(es.value)
    with sm.debug(), pytest.raises(DtypeError) as ed:
        _Broken().as_int(x)
    assert "return value" in str(ed.value) and "expected dtype Float" in str(ed.value) and "got int64" in str(ed.value)


def test_non_tensor_argument_of_wrong_type() -> None:
    with sm.debug(), pytest.raises(DtypeError) as ei:
        _Broken().takes_int(torch.randn(3, 4), "2")  # type: ignore[arg-type]
    assert "parameter 'k': expected type <class 'int'>, got str '2'" in str(ei.value)
