"""Weight loading and the spmd_moe config format of the vLLM plugin, without an engine.

Pure name mapping (spmd_moe.integrations.vllm.weights) is tested in this process; the
model itself is built by tests/vllm_runner.py in a subprocess (vLLM's TP group at size 1,
no engine) and fed good and broken weight streams.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from spmd_moe.errors import CheckpointError, ConfigError  # noqa: E402
from spmd_moe.integrations.vllm import weights as W  # noqa: E402
from spmd_moe.apps.tiny_checkpoint import (  # noqa: E402
    SPMD_ARCH, TinySpec, build_tiny_checkpoint, make_state_dict, per_expert_names,
)

ROOT = Path(__file__).resolve().parents[1]
RUNNER = str(Path(__file__).with_name("vllm_runner.py"))
E, F, D = 8, 6, 10
L = "model.layers.4.mlp"


def test_per_expert_name_keeps_only_this_ranks_experts() -> None:
    w = torch.randn(F, D)
    mine = W.expert_copies(f"{L}.experts.5.up_proj.weight", w, num_experts=E, hidden_dim=F, dim=D, e0=4, e1=8)
    assert len(mine) == 1 and mine[0].param == f"{L}.{W.W3}" and mine[0].local_start == 1 and mine[0].experts == (5,)
    assert torch.equal(mine[0].src[0], w)
    other = W.expert_copies(f"{L}.experts.2.up_proj.weight", w, num_experts=E, hidden_dim=F, dim=D, e0=4, e1=8)
    assert other == []
    down = W.expert_copies(f"{L}.experts.7.down_proj.weight", torch.randn(D, F), num_experts=E, hidden_dim=F, dim=D, e0=4, e1=8)
    assert down[0].param == f"{L}.{W.W2}" and down[0].local_start == 3


def test_fused_names_split_gate_then_up_and_slice_experts() -> None:
    gu = torch.randn(E, 2 * F, D)
    c = W.expert_copies(f"{L}.experts.gate_up_proj", gu, num_experts=E, hidden_dim=F, dim=D, e0=4, e1=8)
    by = {x.param: x for x in c}
    assert torch.equal(by[f"{L}.{W.W1}"].src, gu[4:8, :F]) and torch.equal(by[f"{L}.{W.W3}"].src, gu[4:8, F:])
    assert by[f"{L}.{W.W1}"].experts == (4, 5, 6, 7)
    dn = torch.randn(E, D, F)
    (c2,) = W.expert_copies(f"{L}.experts.down_proj", dn, num_experts=E, hidden_dim=F, dim=D, e0=0, e1=4)
    assert c2.param == f"{L}.{W.W2}" and torch.equal(c2.src, dn[:4])


@pytest.mark.parametrize(
    "name,shape",
    [
        (f"{L}.experts.gate_up_proj", (E, D, 2 * F)),  # transposed fused
        (f"{L}.experts.down_proj", (E, F, D)),
        (f"{L}.experts.1.gate_proj.weight", (D, F)),
        (f"{L}.experts.1.down_proj.weight", (F, D)),
    ],
)
def test_misshaped_expert_weight_is_a_checkpoint_error(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(CheckpointError, match="expected shape"):
        W.expert_copies(name, torch.zeros(shape), num_experts=E, hidden_dim=F, dim=D, e0=0, e1=E)


def test_ledger_rejects_duplicates_and_reports_missing() -> None:
    led = W.ExpertLedger()
    (c,) = W.expert_copies(f"{L}.experts.0.gate_proj.weight", torch.zeros(F, D), num_experts=E, hidden_dim=F, dim=D, e0=0, e1=2)
    led.add(c, "a")
    with pytest.raises(CheckpointError, match=r"already loaded"):
        led.add(c, "b")
    with pytest.raises(CheckpointError, match=r"expert\(s\) \[1\]"):
        led.complete({f"{L}.{W.W1}": (0, 2)})


def test_name_classification() -> None:
    assert W.router_param(f"{L}.gate.weight") == f"{L}.{W.ROUTER}"
    assert W.router_param(f"{L}.gate_proj.weight") is None  # a dense MLP, not a router
    assert not W.is_expert_weight("model.layers.1.mlp.gate_proj.weight")
    assert W.is_expert_weight(f"{L}.experts.gate_up_proj") and W.is_expert_weight(f"{L}.experts.3.down_proj.weight")


def test_tiny_checkpoint_is_deterministic_and_complete(tmp_path: Path) -> None:
    spec = TinySpec()
    a, b = make_state_dict(spec), make_state_dict(spec)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = make_state_dict(TinySpec(seed=1))
    assert not torch.equal(a["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    per = per_expert_names(a)
    assert sum(".experts." in k for k in per) == 2 * 3 * spec.num_experts  # 2 MoE layers
    ck = build_tiny_checkpoint(ROOT / ".spmd_moe_cache")
    assert spec.head_dim == 64 and spec.num_experts >= 8 and spec.num_experts_per_tok >= 2
    size = (ck.hf_dir / "model.safetensors").stat().st_size
    assert 1e6 < size < 8e6
    cfg = json.loads((ck.hf_dir / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["num_hidden_layers"] >= 2


def test_config_parser_reads_spmd_json_and_rejects_bad_folders(tmp_path: Path) -> None:
    from spmd_moe.integrations.vllm.config_parser import SpmdMoeConfigParser, read_spmd_config

    ck = build_tiny_checkpoint(ROOT / ".spmd_moe_cache")
    d, cfg = SpmdMoeConfigParser().parse(str(ck.spmd_dir), trust_remote_code=False)
    assert cfg.architectures == [SPMD_ARCH] and cfg.model_type == "qwen3_moe"
    assert cfg.num_experts == ck.spec.num_experts and cfg.head_dim == 64 and d["format"] == "spmd_moe"
    with pytest.raises(ConfigError, match="spmd_moe.json"):
        read_spmd_config(tmp_path)
    (tmp_path / "spmd_moe.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match='expected "format": "spmd_moe"'):
        read_spmd_config(tmp_path)
    (tmp_path / "spmd_moe.json").write_text(json.dumps({"format": "spmd_moe", "model_type": "llama", "model": {}}))
    with pytest.raises(ConfigError, match="model_type"):
        read_spmd_config(tmp_path)


@pytest.fixture(scope="module")
def load_checks() -> dict[str, Any]:
    ck = build_tiny_checkpoint(ROOT / ".spmd_moe_cache")
    out = Path(ck.root) / f"load_checks_{id(ck)}.json"
    p = subprocess.run(
        [sys.executable, RUNNER, "--load-checks", str(ck.hf_dir), "--fused-dir", str(ck.spmd_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=400,
    )
    assert p.returncode == 0 and out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    res: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return res


def test_meta_construction_then_to_empty_init_states(load_checks: dict[str, Any]) -> None:
    assert load_checks["moe_layers"] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert load_checks["any_meta"] is False
    assert load_checks["init_states_applied"] is True
    # vLLM's RoPE cache (a buffer) survives construction and loading; the 1e-4 bound is
    # fp32 rounding of angles up to max_position rad vs our float64 recomputation.
    assert load_checks["rope_cache_max_err"] < 1e-4 and load_checks["rope_after_load"] == load_checks["rope_cache_max_err"]


def test_load_weights_both_spellings_strict(load_checks: dict[str, Any]) -> None:
    assert load_checks["per_expert_loaded_all"] and load_checks["per_expert_values"]
    assert load_checks["fused_loaded_all"] and load_checks["fused_equals_per_expert"]


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_expert", "got none for expert(s) [5]"),
        ("both_spellings", "already loaded"),
        ("transposed_fused", "expected shape (8, 96, 128), got (8, 128, 96)"),
        ("unexpected_name", "'model.layers.0.mlp.foo.weight': unexpected"),
        ("missing_q_proj", "expected the checkpoint shards ['k', 'q', 'v'], got ['k', 'v']"),
        ("expert_id_out_of_range", "expected an expert id < num_experts=8, got 8"),
        ("experts_on_dense_layer", "not an MoE layer"),
    ],
)
def test_load_weights_errors(load_checks: dict[str, Any], case: str, needle: str) -> None:
    msg = load_checks[case]
    assert msg.startswith("CheckpointError") and needle in msg and "Fix:" in msg, msg


def test_vllm_expert_parallel_flag_refused(load_checks: dict[str, Any]) -> None:
    # vLLM's own EP flag would only steer its fused-MoE kernels (it segfaults on CPU).
    msg = load_checks["expert_parallel_flag"]
    assert msg.startswith("ConfigError") and "enable_expert_parallel" in msg and "Fix:" in msg, msg
