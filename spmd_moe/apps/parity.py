"""``spmd-moe parity``: trainer (torchtitan) vs generator (vLLM) figures, on CPU.

Both sides serve the same weights (the embedded tiny Qwen3-MoE checkpoint, every layer
MoE) and the same sequences:

* generator: the vLLM plugin (SpmdQwen3MoeForCausalLM) at TP=2 = EP=2, layout
  'replicated', batch-invariant mode, greedy decoding of a few prompts; it records
  every MoE layer's inputs, outputs and routes (one prefill call, then decode calls).
* trainer: torchtitan 0.3.0's Qwen3 model with spmd_moe's MoE (use_spmd_moe), TP=2,
  EP=2, sequence parallel (layout 'sequence'), 2 gloo ranks, batch-invariant mode,
  teacher-forced over prompt + generated tokens.

Figures: max |logprob delta| of the generated tokens; the same after routing replay
(the trainer forced to the generator's routes); whether the replay reproduced the
routes exactly; how many MoE output rows differ bitwise when the generator's recorded
MoE inputs go through the trainer's MoE layers (other batches, other layout), and the
same count without batch-invariant mode (the control).

Each side runs in its own interpreter (python -m spmd_moe.integrations.*), so this
module imports neither vLLM nor torchtitan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spmd_moe._subproc import run_in_session

PROMPTS, PROMPT_LEN, MAX_TOKENS = 3, 7, 5


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str], timeout: float, what: str) -> float:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    # A log file, not a pipe: vLLM's worker processes inherit the output handles and
    # may outlive the main process for a while; a pipe would block until they exit.
    with tempfile.TemporaryFile("w+") as log:
        rc = run_in_session(cmd, stdout=log, env=env, timeout=timeout)
        if rc != 0:
            log.seek(0)
            raise RuntimeError(f"parity: {what} exited {rc}:\n{log.read()[-6000:]}")
    return time.perf_counter() - t0


def run_parity(cache_dir: str | None = None, timeout: float = 600) -> dict[str, Any]:
    import torch

    from spmd_moe.apps.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    spec = TinySpec(num_hidden_layers=2, mlp_only_layers=())
    ckpt = build_tiny_checkpoint(cache_dir, spec)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, spec.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    with tempfile.TemporaryDirectory(prefix="spmd_moe_parity_") as d:
        spec_p, gen_p, tr_p = Path(d) / "gen.json", Path(d) / "gen.pt", Path(d) / "trainer.pt"
        spec_p.write_text(json.dumps({"model": str(ckpt.hf_dir), "prompts": prompts, "max_tokens": MAX_TOKENS, "tp": 2}))
        gen_s = _run([sys.executable, "-m", "spmd_moe.apps.parity_generator", str(spec_p), str(gen_p)], timeout, "generator (vLLM)")
        tr_s = _run(
            [sys.executable, "-m", "spmd_moe.integrations.torchtitan", "--parity", str(ckpt.hf_dir), str(gen_p), str(tr_p)],
            timeout, "trainer (torchtitan)",
        )
        gen = torch.load(gen_p, weights_only=False)
        tr = torch.load(tr_p, weights_only=False)
    ok = tr["moe_rows_not_bitwise"] == 0 and tr["replay_exact"] and tr["max_abs_logprob_delta"] < 1e-3
    return {
        "ok": bool(ok),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "model": {"layers": spec.num_hidden_layers, "dim": spec.hidden_size, "experts": spec.num_experts,
                  "top_k": spec.num_experts_per_tok, "expert_hidden": spec.moe_intermediate_size,
                  "vocab": spec.vocab_size, "dtype": "float32"},
        "sequences": {"count": tr["B"], "prompt_len": tr["P"], "generated": tr["N"]},
        "generator": {"engine": "vLLM + spmd_moe plugin", "tp": gen["tp"], "ep": gen["tp"], "layout": "replicated",
                      "batch_invariant": True, "engine_start_s": round(gen["start_s"], 2),
                      "generate_s": round(gen["generate_s"], 3), "wall_s": round(gen_s, 2)},
        "trainer": {"framework": "torchtitan 0.3.0 Qwen3 + spmd_moe MoE", "tp": 2, "ep": 2,
                    "sequence_parallel": True, "layout": "sequence", "batch_invariant": True,
                    "wall_s": round(tr_s, 2)},
        "max_abs_logprob_delta": tr["max_abs_logprob_delta"],
        "max_abs_logprob_delta_replayed": tr["max_abs_logprob_delta_replayed"],
        "routing_replay_exact": tr["replay_exact"],
        "routes_replayed": tr["routes_replayed"],
        "routes_differing_without_replay": tr["routes_differing_without_replay"],
        "moe_layers_compared": tr["moe_layers_compared"],
        "moe_rows_compared": tr["moe_rows_compared"],
        "moe_rows_not_bitwise": tr["moe_rows_not_bitwise"],
        "moe_rows_not_bitwise_without_mode": tr["moe_rows_not_bitwise_without_mode"],
    }


def main(args: argparse.Namespace) -> int:
    try:
        res = run_parity()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(json.dumps({"ok": False, "error": str(e)[-4000:]}) if getattr(args, "json", False) else str(e))
        return 1
    if getattr(args, "json", False):
        print(json.dumps(res, indent=2))
    else:
        print(f"trainer vs generator on {res['machine']['cpu']} ({res['machine']['cores']} cores):")
        for k in ("max_abs_logprob_delta", "max_abs_logprob_delta_replayed", "routing_replay_exact",
                  "moe_rows_compared", "moe_rows_not_bitwise", "moe_rows_not_bitwise_without_mode"):
            print(f"  {k}: {res[k]}")
    return 0 if res["ok"] else 1
