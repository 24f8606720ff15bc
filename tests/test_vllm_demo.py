"""`spmd-moe demo` end to end, as a user runs it: builds the tiny checkpoint into an
empty cache (as in a fresh clone), serves it through the plugin at TP=2/EP=2 in the real
vLLM engine, and prints a parity summary against vLLM native and HF generate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

# Engine starts (20-60 s each on 2 busy cores) run in fixtures/subprocesses: allow them.
pytestmark = pytest.mark.timeout(900)


def test_spmd_moe_demo_cli(tmp_path: Path) -> None:
    env = dict(os.environ, SPMD_MOE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("SPMD_MOE_DEBUG", None)
    p = subprocess.run(
        [sys.executable, "-m", "spmd_moe.apps.cli", "demo"], capture_output=True, text=True, env=env,
        timeout=900, cwd=tmp_path,
    )
    out = p.stdout
    assert p.returncode == 0, out[-4000:] + p.stderr[-4000:]
    assert list((tmp_path / "cache").glob("tiny_qwen3_moe_*/spmd/spmd_moe.json")), "checkpoint not built"
    assert "rank 0/2" in out and "rank 1/2" in out and "holds experts [[0, 4]]" in out and "holds experts [[4, 8]]" in out
    m = re.search(r"tokens equal (\d+)/(\d+) prompts .* max \|logprob delta\| ([0-9.e+-]+) \(limit", out)
    assert m, out
    assert m[1] == m[2] == "4"
    assert float(m[3]) <= 1e-4
    assert "HF generate tokens equal 4/4" in out and out.rstrip().splitlines()[-1].startswith("PASS")
