"""The fast mutation subset (``python -m tests.mutate --fast``) in CI: a few mutants per
category (collective dropped / swapped / moved to another axis, stated placement and
signature letter flipped, wrong input placement), drawn deterministically from the
layer's data path. Every one must be killed, by mypy or by the debug-mode runtime
driver at world 2 and 4; and the unmutated baseline must pass both, so a kill means
the mutant, not a broken checker or driver.

The full run and its figures: ``python -m tests.mutate`` and docs/placements.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("mutate")
    out = tmp / "fast.json"
    env = dict(os.environ, SPMD_MOE_MUTANTS=str(tmp / "work"), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "tests.mutate", "--fast", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), f"tests.mutate --fast wrote no report (rc={r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    summary: dict = json.loads(out.read_text())
    summary["_stdout"] = r.stdout
    return summary


@pytest.mark.timeout(600)
def test_baseline_passes_mypy_and_the_runtime_driver(fast_run: dict) -> None:
    assert fast_run["baseline_mypy_errors"] == [], fast_run["baseline_mypy_errors"]
    assert fast_run["baseline_runtime_problems"] == [], fast_run["baseline_runtime_problems"]


@pytest.mark.timeout(600)
def test_fast_subset_covers_every_category(fast_run: dict) -> None:
    cats = {row["category"] for row in fast_run["table"]} - {"all"}
    assert {"drop", "swap", "state", "sig", "input"} <= cats, cats
    assert fast_run["selected"] >= 12


@pytest.mark.timeout(600)
def test_every_fast_mutant_is_killed(fast_run: dict) -> None:
    survivors = [f"{s['where']} [{s['category']}] {s['mutation']}" for s in fast_run["survivors"]]
    assert not survivors, "mutants not killed by mypy nor by the debug-mode run:\n" + "\n".join(survivors)
