"""``spmd-moe parity --json`` end to end on CPU: the vLLM plugin (generator, TP=2=EP=2)
and torchtitan's Qwen3 with spmd_moe's MoE (trainer, TP=2=EP=2, sequence parallel),
same weights, same sequences, both in batch-invariant mode.

Asserted:
* the MoE layers agree bitwise: every MoE output row the generator produced inside
  vLLM (prefill and decode batches, replicated layout) is reproduced exactly by the
  trainer's MoE layers run on the same inputs in other batches (sequence layout);
* routing replay reproduces the generator's routes exactly;
* per-token logprobs of the generated tokens agree within 1e-3 (fp32 on both sides;
  the rest of the model differs: vLLM's CPU attention kernel vs torch SDPA, vLLM's
  vs torchtitan's TP reductions. Measured about 5e-7; a wrong weight mapping, RoPE or
  route moves logprobs by far more than 1e-3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Both frameworks run in subprocesses; only check that they are installed.
for _mod in ("vllm", "torchtitan"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed", allow_module_level=True)


@pytest.mark.timeout(900)
def test_parity_cli_json() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "spmd_moe.apps.cli", "parity", "--json"],
        capture_output=True, text=True, timeout=880, env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["ok"] is True
    assert res["generator"]["tp"] == 2 and res["generator"]["ep"] == 2
    assert res["trainer"]["tp"] == 2 and res["trainer"]["ep"] == 2
    assert res["moe_layers_compared"] == 2
    # 3 prompts x 7 tokens prefill + 4 decode steps x 3 tokens, per layer, 2 layers.
    assert res["moe_rows_compared"] == 2 * (3 * 7 + 4 * 3)
    assert res["moe_rows_not_bitwise"] == 0
    assert res["routing_replay_exact"] is True
    # Every position the generator routed (all but each sequence's last token), per layer.
    assert res["routes_replayed"] >= 2 * 3 * (7 + 4) * 9 // 10
    assert res["max_abs_logprob_delta"] < 1e-3
    assert res["max_abs_logprob_delta_replayed"] < 1e-3
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"]
