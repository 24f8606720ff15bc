"""`spmd-moe check`: the verb run as a user runs it (a subprocess of `python -m
spmd_moe.apps.cli check ...` from the repository root), on real spawned gloo worlds of
2 and 4 CPU ranks.

* the project's own models pass: spmd_moe.MoE in each layout (two configs), the vLLM
  plugin's MoE block for its three families, the torchtitan adapter's SpmdMoE with and
  without sequence parallel (spmd_moe/apps/check_factories.py);
* examples/working_moe.py passes and both bugs planted in examples/broken_moe.py are
  found: non-zero exit, the error, its fix and the user's line, in the text report
  and in --json;
* the check's own machinery: a rank that raises alone (its peers wait in a collective)
  and a rank that never returns are reported and end in bounded time; the token
  accounting check fires on counts that are off; a factory returning the wrong thing
  and a target that cannot be imported are reported with the fix.

The targets that misbehave on purpose are defined at the bottom of this module (the
ranks import them as ``tests.test_check_cli:NAME``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
F = "spmd_moe.apps.check_factories"


def run_check(*args: str, timeout: float = 900) -> tuple[int, str, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_MOE_PROGRESS": "0"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "spmd_moe.apps.cli", "check", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def run_json(*args: str, timeout: float = 900) -> tuple[int, dict[str, Any], float]:
    rc, out, err, wall = run_check(*args, "--json", timeout=timeout)
    try:
        return rc, json.loads(out), wall
    except json.JSONDecodeError:
        raise AssertionError(f"rc={rc}, no JSON on stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}") from None


def runs_of(report: dict[str, Any], target: str) -> dict[int, dict[str, Any]]:
    return {t["world"]: t for t in report["runs"] if t["target"] == target}


def errors_of(case: dict[str, Any]) -> list[dict[str, Any]]:
    return list(case["errors"]) + list(case["findings"])


# ----------------------------------------------------------------------------- cases
def test_cases_cover_the_adversarial_counts() -> None:
    from spmd_moe.apps.check import cases_for

    for n in (2, 4):
        for layout in ("replicated", "invariant"):
            cases = cases_for(layout, n)
            runs = [c for c in cases if c.kind == "run"]
            assert all(len(set(c.counts)) == 1 and len(c.counts) == n for c in runs)  # same T on every rank
            ts = [c.counts[0] for c in runs]
            assert 0 in ts and 1 in ts and n - 1 in ts  # empty, one token, fewer than ranks
            assert any(t % 2 == 1 and t % n != 0 and t > n for t in ts)  # odd, not a multiple: uneven split
            assert any(t > 16 * n for t in ts)  # above 'auto's decode limit: the all-to-all path
            assert any(t % n == 0 and t > 0 for t in ts)  # the control
            assert [c.kind for c in cases][-1] == "probe"
        cases = cases_for("sequence", n)
        counts = [c.counts for c in cases if c.kind == "run"]
        assert (0,) * n in counts  # every rank empty
        assert any(sum(c) == 1 for c in counts)  # one token in the world
        assert any(0 < sum(c) < n for c in counts if sum(c) > 1 or n == 2)  # fewer tokens than ranks
        assert any(len(set(c)) == n for c in counts)  # every rank a different count
        assert any(0 in c and max(c) > 1 for c in counts)  # an empty rank among full ones
        assert any(all(t % 2 == 1 for t in c) for c in counts)  # odd counts
        assert any(max(c) > 16 for c in counts)
        assert len(counts) == len(set(counts))
    # One rank: every placement is the same thing, so there is no misuse to probe.
    assert all(c.kind == "run" for lay in ("replicated", "sequence") for c in cases_for(lay, 1))


# ----------------------------------------------------------------------------- the project's models
@pytest.mark.timeout(1500)
def test_project_models_pass() -> None:
    targets = {
        f"{F}:moe_replicated": "replicated", f"{F}:moe_invariant": "invariant",
        f"{F}:moe_sequence": "sequence", f"{F}:moe_sequence_grouped": "sequence",
        f"{F}:vllm_qwen3_moe_block": "replicated", f"{F}:vllm_qwen2_moe_block": "replicated",
        f"{F}:vllm_mixtral_block": "replicated",
        f"{F}:torchtitan_sequence_parallel": "sequence", f"{F}:torchtitan_tensor_parallel": "invariant",
    }
    rc, rep, wall = run_json(*targets, "--worlds", "2,4", timeout=1400)
    print(f"project models: {rep['summary']} in {wall:.0f} s")
    bad = [(t["target"], t["world"], c["case"], errors_of(c)) for t in rep["runs"] for c in t["cases"] if c["status"] != "ok"]
    assert not bad, bad
    assert not [t["errors"] for t in rep["runs"] if t["errors"]]
    assert rc == 0 and rep["ok"]
    for spec, layout in targets.items():
        by_world = runs_of(rep, spec)
        assert sorted(by_world) == [2, 4]
        for n, t in by_world.items():
            assert t["layout"] == layout, (spec, n, t["layout"])
            assert t["moe_layers"] == 1
            cases = {c["case"]: c for c in t["cases"]}
            assert "empty" in cases and "one" in cases and "prefill" in cases
            # The misuse probe was stopped by the layer's debug-mode check.
            probe = cases["probe"]
            assert probe["caught"] and all(e["type"] == "PlacementError" for e in probe["caught"]), probe
            # The serving pass (debug off, inference_mode) ran on every case with tokens
            # and matched the debug-mode output (within the check's tolerance; printed).
            for c in t["cases"]:
                if c["kind"] == "run" and sum(c["counts"]) > 0:
                    assert c.get("serving_maxrel") is not None, (spec, n, c)
    served = [c["serving_maxrel"] for t in rep["runs"] for c in t["cases"] if c.get("serving_maxrel") is not None]
    print(f"serving pass vs debug mode: {len(served)} cases, largest relative difference {max(served):.3g}")


# ----------------------------------------------------------------------------- the examples
@pytest.mark.timeout(900)
def test_examples_working_passes_broken_is_found() -> None:
    working = "examples/working_moe.py:build"
    slices = "examples.broken_moe:slices_into_replicated"
    counts = "examples/broken_moe.py:local_counts_as_global"
    padding = "examples/broken_moe.py:padding_policy_missing"
    rc, rep, wall = run_json(working, slices, counts, padding, "--worlds", "2,4", "--collective-timeout", "20")
    print(f"examples: {rep['summary']} in {wall:.0f} s")
    assert rc == 1 and not rep["ok"]
    src = (REPO / "examples" / "broken_moe.py").read_text().splitlines()
    moe_line = next(i + 1 for i, s in enumerate(src) if "y_TD = x_TD + self.moe(h_TD)" in s)
    counts_line = next(i + 1 for i, s in enumerate(src) if 'as_rep(self.moe.tokens_per_expert_E' in s)
    for n in (2, 4):
        w = runs_of(rep, working)[n]
        assert w["layout"] == "sequence" and all(c["status"] == "ok" for c in w["cases"]), w

        # Bug 1: token slices into the replicated layout.
        s = {c["case"]: c for c in runs_of(rep, slices)[n]["cases"]}
        assert s["empty"]["status"] == "ok"  # zero tokens everywhere: nothing differs
        for cid in ("one", "uneven", "uneven_empty", "prefill", "ones", "odd"):
            c = s[cid]
            assert c["status"] == "fail", c
            errs = errors_of(c)
            assert sorted(r for e in errs for r in e["ranks"]) == list(range(n)), errs  # every rank raised
            for e in errs:
                assert e["spmd_moe"] and e["phase"] == "forward"
                assert e["where"].startswith(f"examples/broken_moe.py:{moe_line} "), e["where"]
                assert "layout 'sequence'" in e["fix"], e
                assert "moe" in e["message"] and f"size {n}" in e["message"] or "ranks disagree" in e["message"], e
        # Equal slice sizes: the values differ -> PlacementError naming the tensor and R.
        e = errors_of(s["odd"])[0]
        assert e["type"] == "PlacementError", e
        assert "moe: x_TD on axis 'ep'" in e["message"] and "expected placement R" in e["message"], e
        # Unequal sizes: the layer's header exchange refuses first.
        assert errors_of(s["uneven"])[0]["type"] == "DistributedError"
        # The probe (identical tokens, which a replicated layer accepts) warns: the
        # declared layout is not what the model states.
        assert s["probe"]["status"] == "warn" and "not verified" in s["probe"]["note"]

        # Bug 2: local counts stated as the global ones.
        k = {c["case"]: c for c in runs_of(rep, counts)[n]["cases"]}
        assert k["empty"]["status"] == "ok"  # all-zero counts are equal everywhere
        for cid in ("one", "one_last", "uneven", "prefill"):
            c = k[cid]
            assert c["status"] == "fail", c
            (e,) = errors_of(c)
            assert e["type"] == "PlacementError" and e["phase"] == "forward" and e["ranks"] == list(range(n)), e
            assert "tokens_per_expert_E on axis 'ep'" in e["message"] and "expected placement R" in e["message"]
            assert "differs across ranks" in e["message"]
            # A count is a summand: the fix is a sum (as_par + all_reduce), not a gather.
            assert e["fix"] and "as_par" in e["fix"] and "global_tokens_per_expert()" in e["fix"], e
            assert e["where"].startswith(f"examples/broken_moe.py:{counts_line} "), e["where"]
        assert k["probe"]["status"] == "ok"  # a sequence layer: the misuse is caught

        # Bug 3: no padding policy. T a multiple of n passes; every other T raises on
        # every rank, before any data moves, offering both choices.
        p = {c["case"]: c for c in runs_of(rep, padding)[n]["cases"]}
        assert p["empty"]["status"] == "ok" and p["even"]["status"] == "ok"
        for cid in ("one", "odd", "prefill"):
            (e,) = errors_of(p[cid])
            assert e["type"] == "PaddingError" and e["ranks"] == list(range(n)), e
            T = p[cid]["counts"][0]
            assert f"T={T}" in e["message"] and f"size {n}" in e["message"] and "padding is not set" in e["message"], e
            assert "MoEConfig(padding='pad')" in e["fix"] and "padding='error'" in e["fix"], e
    # The distinct fixes, with the user's lines.
    wheres = {f["where"].split(" ")[0] for f in rep["fixes"]}
    assert {f"examples/broken_moe.py:{moe_line}", f"examples/broken_moe.py:{counts_line}"} <= wheres


@pytest.mark.timeout(600)
def test_broken_example_text_report() -> None:
    rc, out, err, wall = run_check("examples/broken_moe.py:slices_into_replicated", "--worlds", "2")
    assert rc == 1, (out, err)
    assert "FAIL case 'odd'" in out and "PlacementError (forward, ranks [0, 1])" in out, out
    assert "moe: x_TD on axis 'ep' (size 2): expected placement R" in out
    assert "fix: " in out and "layout 'sequence' instead" in out
    assert "at: examples/broken_moe.py:" in out
    assert "WARN case 'probe'" in out
    # The summary table: a header with the world column, one row per case.
    assert "target" in out and "world 2" in out and "broken_moe:slices_into_replicated  odd" in out
    assert out.rstrip().endswith("RESULT: FAIL")
    assert "[check]" in err  # progress and its summary on stderr, not stdout


# ----------------------------------------------------------------------------- the machinery
def test_target_that_cannot_be_imported() -> None:
    rc, out, err, _ = run_check("no_such_module_xyz:build", "--worlds", "2")
    assert rc == 2 and "No module named 'no_such_module_xyz'" in err, err
    rc, out, err, _ = run_check("examples/working_moe.py:nope", "--worlds", "2")
    assert rc == 2 and "expected a callable 'nope'" in err and "Fix:" in err, err
    rc, out, err, _ = run_check("examples/working_moe.py", "--json")
    assert rc == 2 and "expected MODULE:FACTORY" in json.loads(out)["error"]
    rc, out, err, _ = run_check("examples/working_moe.py:build", "--cases", "odd,nope")
    assert rc == 2 and "--cases: expected some of" in err and "'uneven'" in err, err


@pytest.mark.timeout(900)
def test_rank_raising_alone_wrong_return_and_miscounts_are_reported() -> None:
    me = "tests.test_check_cli"
    rc, rep, wall = run_json(f"{me}:raises_on_rank0", f"{me}:returns_a_linear", f"{me}:counts_twice",
                             f"{me}:output_not_gathered", f"{me}:replicated_where_invariant", f"{me}:per_rank_seed",
                             f"{me}:serving_path_differs",
                             "--worlds", "2,4", "--collective-timeout", "5", timeout=800)
    print(f"machinery: {rep['summary']} in {wall:.0f} s")
    assert rc == 1
    for n in (2, 4):
        r = {c["case"]: c for c in runs_of(rep, f"{me}:raises_on_rank0")[n]["cases"]}
        errs = {e["type"]: e for e in r["odd"]["errors"]}
        assert errs["ValueError"]["ranks"] == [0] and "planted" in errs["ValueError"]["message"]
        assert errs["ValueError"]["where"].startswith("tests/test_check_cli.py:")
        # The peers waited in the layer's collective and gave up after --collective-timeout.
        waited = [e for e in r["odd"]["errors"] if e["type"] != "ValueError"]
        assert sorted(x for e in waited for x in e["ranks"]) == list(range(1, n)), waited
        # The next cases run on a fresh group and pass.
        for cid in ("even", "prefill", "probe", "empty", "one"):
            assert r[cid]["status"] == "ok", r[cid]

        w = runs_of(rep, f"{me}:returns_a_linear")[n]
        assert not w["cases"] and w["errors"][0]["type"] == "TypeError"
        assert "CheckTarget(module, layout=" in w["errors"][0]["fix"]

        c = {x["case"]: x for x in runs_of(rep, f"{me}:counts_twice")[n]["cases"]}
        assert c["empty"]["status"] == "ok"  # nothing counted, nothing doubled
        (f,) = c["odd"]["findings"]
        assert f["type"] == "TokenAccounting" and f["ranks"] == list(range(n))
        T = 2 * n + 1
        assert f"expected top_k x tokens = 2 x {T} = {2 * T}, got {4 * T:g} (2 x)" in f["message"], f
        assert "#3622" in f["fix"]

        # Checks debug mode cannot make (the tensors are never stated): a replicated
        # output that differs per rank, an invariant input gradient that is Partial.
        o = {x["case"]: x for x in runs_of(rep, f"{me}:output_not_gathered")[n]["cases"]}
        for cid in ("one", "odd", "even", "prefill"):
            (f,) = o[cid]["findings"]
            assert f["type"] == "OutputDiffers" and f"over {n} ranks" in f["message"], f
        g = {x["case"]: x for x in runs_of(rep, f"{me}:replicated_where_invariant")[n]["cases"]}
        assert g["empty"]["status"] == "ok"
        for cid in ("one", "odd", "even", "prefill"):
            (f,) = g[cid]["findings"]
            assert f["type"] == "GradientDiffers" and "invariant_to_replicate" in f["fix"], f

        # Weights initialized from a per-rank seed: the layer's replicated gate is
        # verified from its values in debug mode.
        ps = {x["case"]: x for x in runs_of(rep, f"{me}:per_rank_seed")[n]["cases"]}
        for cid in ("one", "odd", "even"):
            (e,) = ps[cid]["errors"]
            assert e["type"] == "PlacementError" and "router.gate.weight on axis 'ep'" in e["message"], e
            assert "per-rank seed" in e["fix"] and e["where"].startswith("spmd_moe/moe.py:"), e

        # The serving pass (debug off, inference_mode) computing something else.
        sv = {x["case"]: x for x in runs_of(rep, f"{me}:serving_path_differs")[n]["cases"]}
        assert sv["empty"]["status"] == "ok"
        for cid in ("one", "odd", "even", "prefill"):
            (f,) = sv[cid]["findings"]
            assert f["type"] == "ServingPathDiffers" and f["phase"] == "serving" and f["ranks"] == list(range(n)), f
            assert abs(sv[cid]["serving_maxrel"] - 0.5) < 1e-6, sv[cid]  # the planted factor 1.5
    assert wall < 800


@pytest.mark.timeout(400)
def test_rank_that_never_returns_is_killed() -> None:
    rc, rep, wall = run_json("tests.test_check_cli:hangs_on_rank1", "--worlds", "2", "--timeout", "90",
                             "--collective-timeout", "10", timeout=250)
    assert rc == 1 and not rep["ok"]
    assert wall < 90 + 90  # the world's timeout plus start-up and the kill
    (t,) = rep["runs"]
    assert t["killed_ranks"] == [0, 1]  # rank 0 waited for rank 1 in the check's own exchange
    cases = {c["case"]: c for c in t["cases"]}
    errs = {e["type"]: e for e in cases["empty"]["errors"]}
    assert errs["Hang"]["ranks"] == [1] and "killed" in errs["Hang"]["message"], cases["empty"]
    # Rank 0 waited in the layer's first collective and gave up after --collective-timeout;
    # its own verdict (written before the exchange that never completed) is kept.
    (waited,) = [e for k, e in errs.items() if k != "Hang"]
    assert waited["ranks"] == [0] and waited["phase"] == "forward", waited
    assert all(c["status"] == "not run" for cid, c in cases.items() if cid != "empty")
    assert rep["summary"]["not_run"] == len(cases) - 1


@pytest.mark.timeout(300)
def test_rank_that_dies_stops_the_world_at_once() -> None:
    rc, rep, wall = run_json("tests.test_check_cli:exits_on_rank1", "--worlds", "2", "--timeout", "200",
                             "--cases", "empty,one,even", timeout=250)
    assert rc == 1 and not rep["ok"]
    assert wall < 120  # not the world's 200 s timeout: the parent saw the exit code
    (t,) = rep["runs"]
    cases = {c["case"]: c for c in t["cases"]}
    died = [e for e in cases["empty"]["errors"] if e["type"] == "RankDied"]
    assert died and died[0]["ranks"] == [1] and "code 3" in died[0]["message"], cases["empty"]
    assert all(c["status"] == "not run" for cid, c in cases.items() if cid != "empty")
    assert sorted(cases) == ["empty", "even", "one"]  # --cases


# ----------------------------------------------------------------------------- targets for the tests above
def _moe(pctx: Any, layout: str) -> Any:
    import spmd_moe as sm

    moe = sm.MoE(sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, padding="pad"), pctx, layout=layout)
    moe.init_states(seed=0)
    return moe


class _RaisesOnRank0(nn.Module):
    def __init__(self, pctx: Any) -> None:
        super().__init__()
        self.moe, self.pctx = _moe(pctx, "replicated"), pctx

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        print(f"a model that prints (rank {self.pctx.rank}): stdout stays the report's")  # --json still parses
        if self.pctx.rank == 0 and x_TD.shape[0] == 2 * self.pctx.size + 1:  # the 'odd' case only
            raise ValueError("planted: rank 0 fails before the layer; the other ranks wait in its collective")
        out: torch.Tensor = self.moe(x_TD)
        return out


def raises_on_rank0(pctx: Any) -> Any:
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_RaisesOnRank0(pctx), layout="replicated", dim=16)


def returns_a_linear(pctx: Any) -> Any:
    return nn.Linear(16, 16)


class _CountsTwice(nn.Module):
    def __init__(self, pctx: Any) -> None:
        super().__init__()
        self.moe = _moe(pctx, "replicated")

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.moe(x_TD)
        with torch.no_grad():
            self.moe.tokens_per_expert_E.mul_(2)  # planted: every token counted twice
        return out


def counts_twice(pctx: Any) -> Any:
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_CountsTwice(pctx), layout="replicated", dim=16)


class _HangsOnRank1(nn.Module):
    def __init__(self, pctx: Any) -> None:
        super().__init__()
        self.moe, self.pctx = _moe(pctx, "replicated"), pctx

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.pctx.rank == 1:
            time.sleep(10_000)  # planted: never returns (not in a collective: only the kill ends it)
        out: torch.Tensor = self.moe(x_TD)
        return out


def hangs_on_rank1(pctx: Any) -> Any:
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_HangsOnRank1(pctx), layout="replicated", dim=16)


class _ExitsOnRank1(nn.Module):
    def __init__(self, pctx: Any) -> None:
        super().__init__()
        self.moe, self.pctx = _moe(pctx, "replicated"), pctx

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.pctx.rank == 1:
            os._exit(3)  # planted: the process dies mid-forward
        out: torch.Tensor = self.moe(x_TD)
        return out


def exits_on_rank1(pctx: Any) -> Any:
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_ExitsOnRank1(pctx), layout="replicated", dim=16)


class _OutputNotGathered(nn.Module):
    def __init__(self, pctx: Any) -> None:
        super().__init__()
        self.moe, self.pctx = _moe(pctx, "replicated"), pctx

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.moe(x_TD)
        return out + 0.01 * self.pctx.rank  # planted: a per-rank term after the replicated layer


def output_not_gathered(pctx: Any) -> Any:
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_OutputNotGathered(pctx), layout="replicated", dim=16)


def replicated_where_invariant(pctx: Any) -> Any:
    """Planted: a Megatron-style TP model (complete input gradients on every rank:
    'invariant') that built its MoE with layout 'replicated' (Partial input gradient)."""
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_moe(pctx, "replicated"), layout="invariant", dim=16)


def per_rank_seed(pctx: Any) -> Any:
    """Planted: the gate initialized from a per-rank seed (the layer's init_states skipped)."""
    import spmd_moe as sm

    torch.manual_seed(1234 + pctx.rank)
    moe = sm.MoE(sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, padding="pad"), pctx, layout="replicated")
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    return moe


class _ServingPathDiffers(nn.Module):
    def __init__(self, pctx: Any) -> None:
        super().__init__()
        self.moe = _moe(pctx, "replicated")

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.moe(x_TD)
        if torch.is_inference_mode_enabled():
            out = out * 1.5  # planted: the serving path scales differently
        return out


def serving_path_differs(pctx: Any) -> Any:
    from spmd_moe.apps.check import CheckTarget

    return CheckTarget(_ServingPathDiffers(pctx), layout="replicated", dim=16, inference=True)
