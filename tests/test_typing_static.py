"""mypy sees placements: each known-bad snippet is rejected where it says, good ones pass.

A snippet marks each line mypy must reject with ``# E: <fragment of the message>``.
One mypy run (the repo's mypy.ini, strict) covers every snippet; its report is split
per file. A bad snippet passes only if every marked line has an error containing its
fragment and no other line has an error; a good snippet must have no error at all.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = os.path.join("tests", "typing_snippets")
FILES = sorted(f for f in os.listdir(os.path.join(REPO, SNIPPETS)) if f.endswith(".py"))
_ERROR = re.compile(r"^(?P<path>[^:]+\.py):(?P<line>\d+): error: (?P<msg>.*)$")


@pytest.fixture(scope="module")
def report() -> dict[str, dict[int, list[str]]]:
    from mypy import api

    cwd = os.getcwd()
    os.chdir(REPO)  # mypy.ini and the cache are relative to the repo
    try:
        stdout, stderr, status = api.run(
            ["--config-file", "mypy.ini", "--no-error-summary", "--show-error-codes",
             *[os.path.join(SNIPPETS, f) for f in FILES]]
        )
    finally:
        os.chdir(cwd)
    assert status in (0, 1), f"mypy crashed ({status}): {stderr}\n{stdout}"
    errors: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for line in stdout.splitlines():
        m = _ERROR.match(line)
        if m and os.path.dirname(m["path"]) == SNIPPETS:
            errors[os.path.basename(m["path"])][int(m["line"])].append(m["msg"])
    return errors


def _expected(fname: str) -> dict[int, str]:
    with open(os.path.join(REPO, SNIPPETS, fname)) as f:
        return {i: ln.split("# E: ", 1)[1].strip() for i, ln in enumerate(f, 1) if "# E: " in ln}


def test_snippets_exist() -> None:
    bad = [f for f in FILES if f.startswith("bad_")]
    good = [f for f in FILES if f.startswith("good_")]
    assert len(bad) >= 4 and good, FILES
    for f in bad:
        assert _expected(f), f"{f} marks no line with '# E:'"


@pytest.mark.parametrize("fname", [f for f in FILES if f.startswith("bad_")])
def test_bad_snippet_is_rejected(fname: str, report: dict[str, dict[int, list[str]]]) -> None:
    got = report.get(fname, {})
    for line, fragment in _expected(fname).items():
        msgs = got.get(line, [])
        assert any(fragment in m for m in msgs), f"{fname}:{line}: expected an error containing {fragment!r}, got {msgs}"
    unexpected = {ln: m for ln, m in got.items() if ln not in _expected(fname)}
    assert not unexpected, f"{fname}: errors on unmarked lines: {unexpected}"


@pytest.mark.parametrize("fname", [f for f in FILES if f.startswith("good_")])
def test_good_snippet_passes(fname: str, report: dict[str, dict[int, list[str]]]) -> None:
    assert not report.get(fname), f"{fname}: {dict(report[fname])}"


def test_plugin_with_one_config_line(tmp_path: "os.PathLike[str]") -> None:
    """A user's project enables the plugin with one line and gets placement errors in
    their own code (mypy run from outside the repo, on the installed package)."""
    import subprocess
    import sys
    import textwrap

    d = os.fspath(tmp_path)
    with open(os.path.join(d, "mypy.ini"), "w") as f:
        f.write("[mypy]\nplugins = spmd_moe.mypy_plugin\n")
    with open(os.path.join(d, "user_model.py"), "w") as f:
        f.write(textwrap.dedent('''
            import torch.nn.functional as F
            from spmd_moe import collectives as C
            from spmd_moe.parallel import ParallelContext
            from spmd_moe.placement import EP, Par, Placed, Var

            def my_head(h: Placed[Par[EP]], ep: ParallelContext[EP]) -> Placed[Var[EP]]:
                probs = F.softmax(h, dim=-1)
                return C.reduce_scatter(h, ep)
            '''))
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--show-error-codes", "user_model.py"],
        cwd=d, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [ln for ln in out.stdout.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "user_model.py:8:" in errors[0] and "partial_nonlinear" in errors[0], out.stdout
    assert "[spmd-placement]" in errors[0]
