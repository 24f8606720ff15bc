"""`spmd-moe bench --json` on the CPU: small shapes, short, JSON with sane numbers.

The timings themselves are not judged here (targets live in spmd_moe/apps/bench and
docs/performance.md); this checks that the command runs and reports what it should.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROW_MS_KEYS = ("spmd_fwd_ms", "titan_fwd_ms", "gemm_ms", "spmd_fwdbwd_ms", "titan_fwdbwd_ms")


def test_bench_json_cpu(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # From another directory: the bench code ships inside the package.
    proc = subprocess.run(
        [sys.executable, "-m", "spmd_moe.apps.cli", "bench", "--json", "--plot", str(png)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress (spmd_moe.apps.progress, tqdm) goes to stderr, one line per step when
    # stderr is not a terminal, then the summary; the JSON is alone on stdout.
    n_steps = len(json.loads(proc.stdout)["shapes"]["tokens"]) + 2  # each T, overhead, plot
    for i in range(1, n_steps + 1):
        assert f"] {i}/{n_steps} " in proc.stderr, (i, proc.stderr[-2000:])
    assert "[bench] done in " in proc.stderr and f"({n_steps}/{n_steps} step)" in proc.stderr
    res = json.loads(proc.stdout)

    assert res["machine"]["device"] == "cpu"
    assert res["shapes"]["dim"] > 0 and res["shapes"]["top_k"] >= 1
    # Small shapes stay small: 8 s alone on this 2-core AMD EPYC, 45 s with 6 other test
    # jobs on it; the bound catches full-size shapes leaking into the CPU default.
    assert res["wall_s"] < 180, f"bench took {res['wall_s']:.1f} s on CPU"
    rows = res["rows"]
    assert [r["T"] for r in rows] == list(res["shapes"]["tokens"])
    for r in rows:
        for k in ROW_MS_KEYS:
            assert k in r, (k, r)
            assert math.isfinite(r[k]) and 0 < r[k] < 10_000, (k, r[k])
        assert 1 <= r["touched_experts"] <= res["shapes"]["experts"]
        assert r["speedup_fwd_vs_titan"] > 0
        # Same weights: same function up to bf16 rounding (and torchtitan's bf16 CPU gate,
        # which may flip near-tied expert choices).
        assert r["rel_err_vs_titan"] < 0.5
    assert "overhead" in res and "targets" in res
    if importlib.util.find_spec("matplotlib") is not None:  # in the [dev] extra
        assert res["plot"] == str(png)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, data[:16]
    else:
        assert "not written" in res["plot"]
        assert not png.exists()
