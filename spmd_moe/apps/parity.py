"""``spmd-moe parity``: trainer (torchtitan) vs generator (vLLM) figures, on CPU.

Both sides serve the same weights (the embedded tiny Qwen3-MoE checkpoint, every layer
MoE) and the same sequences:

* generator: the vLLM plugin (SpmdQwen3MoeForCausalLM) at TP=2 = EP=2, layout
  'replicated', batch-invariant mode, greedy decoding of a few prompts; it records
  every MoE layer's inputs, outputs and routes (one prefill call, then decode calls).
* trainer: torchtitan 0.3.0's Qwen3 model with spmd_moe's MoE (use_spmd_moe), run twice:
  TP=2, EP=2, sequence parallel (layout 'sequence', 2 gloo ranks) and EP=1 (one rank),
  batch-invariant mode, teacher-forced over prompt + generated tokens
  (spmd_moe.apps.parity_trainer).

Figures: max |logprob delta| of the generated tokens; the same after routing replay
(the trainer forced to the generator's routes); whether the replay reproduced the
routes exactly; how many MoE output rows differ bitwise when the generator's recorded
MoE inputs go through the trainer's MoE layers (other batches, other layout), and the
same count without batch-invariant mode (the control); whether the per-token logprobs
are bitwise equal, and if not the first op that breaks it (an op-by-op trace of the
EP=1 trainer against the generator's recorded activations), its delta and a plan.

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


PLANS = {
    "embed": "the embedding is a row gather on both sides: a difference here means the weights differ "
             "(check the HF -> torchtitan state-dict mapping).",
    "attn_norm": "vLLM's CPU RMSNorm kernel (fused residual add) vs torchtitan's RMSNorm: reduce over D in "
                 "another order. Plan: one batch-invariant RMSNorm (fixed-order sum of squares per token, "
                 "spmd_moe-provided) swapped into both models (vLLM's RMSNorm custom op and torchtitan's "
                 "norm modules), residual add kept separate (exact).",
    "attn": "vLLM's CPU attention (paged KV cache, its own softmax/PV reduction order, QKV/O GEMMs at the "
            "scheduled batch's M, TP all-reduce) vs torch SDPA over whole sequences. Plan: batch-invariant "
            "QKV/O GEMMs (the blocks of spmd_moe.batch_invariant) and one attention kernel with a fixed "
            "reduction order over KV positions per query on both sides (vLLM attention backend + "
            "torchtitan inner_attention), as in the MoE.",
    "qkv": "the QKV projection GEMM: vLLM runs it on the scheduled batch (M = this step's tokens, "
           "column-parallel over TP), torchtitan on whole sequences (another M): the row's result depends "
           "on M on this CPU. Plan: the QKV/O (and LM head) GEMMs through spmd_moe.batch_invariant's blocks "
           "on both sides (vLLM linear method + torchtitan linear modules), then re-measure.",
    "attn_core": "the attention kernel (RoPE, q/k norm, softmax(QK^T)V): vLLM's CPU attention over its paged "
                 "KV cache vs torch SDPA. Plan: one attention with a fixed reduction order over KV positions "
                 "per query on both sides.",
    "ffn_norm": "as attn_norm (post-attention RMSNorm).",
    "moe": "the MoE layer itself (should be bitwise in batch-invariant mode: see moe_rows_not_bitwise).",
    "final_norm": "as attn_norm (final RMSNorm); then the LM head GEMM (same plan as the QKV/O GEMMs).",
}


def _plan(stage: str | None) -> str | None:
    if stage is None:
        return None
    return PLANS.get(stage.split(".")[-1])


def _trainer_fields(tr: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_abs_logprob_delta", "logprobs_bitwise_equal", "logprobs_compared", "max_abs_logprob_delta_replayed",
            "logprobs_bitwise_equal_replayed", "replay_exact", "routes_replayed", "routes_differing_without_replay",
            "moe_layers_compared", "moe_rows_compared", "moe_rows_not_bitwise", "moe_rows_not_bitwise_without_mode")
    return {k: tr[k] for k in keys}


def run_parity(cache_dir: str | None = None, timeout: float = 600, worlds: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    import torch

    from spmd_moe.apps.progress import progress
    from spmd_moe.apps.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    spec = TinySpec(num_hidden_layers=2, mlp_only_layers=())
    ckpt = build_tiny_checkpoint(cache_dir, spec)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, spec.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    trs: dict[int, dict[str, Any]] = {}
    walls: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="spmd_moe_parity_") as d, \
            progress("parity", total=1 + len(worlds), unit="run") as p:
        spec_p, gen_p = Path(d) / "gen.json", Path(d) / "gen.pt"
        spec_p.write_text(json.dumps({"model": str(ckpt.hf_dir), "prompts": prompts, "max_tokens": MAX_TOKENS, "tp": 2}))
        p.status("generator: vLLM + spmd_moe plugin, TP=2=EP=2 (engine start takes a while)")
        gen_s = _run([sys.executable, "-m", "spmd_moe.apps.parity_generator", str(spec_p), str(gen_p)], timeout, "generator (vLLM)")
        p.step(f"generator done in {gen_s:.1f} s")
        for w in worlds:
            tr_p = Path(d) / f"trainer{w}.pt"
            p.status(f"trainer: torchtitan Qwen3, EP=TP={w}{' (sequence parallel)' if w > 1 else ''}")
            walls[w] = _run([sys.executable, "-m", "spmd_moe.apps.parity_trainer", str(w), str(ckpt.hf_dir), str(gen_p),
                             str(tr_p)], timeout, f"trainer (torchtitan, EP={w})")
            trs[w] = torch.load(tr_p, weights_only=False)
            p.step(f"trainer EP={w}: logprobs bitwise {trs[w]['logprobs_bitwise_equal']}/{trs[w]['logprobs_compared']}, "
                   f"MoE rows not bitwise {trs[w]['moe_rows_not_bitwise']}")
        gen = torch.load(gen_p, weights_only=False)
        main_w = max(worlds)
        tr = trs[main_w]
        trace = next((trs[w]["trace"] for w in worlds if "trace" in trs[w]), None)
        first = trace["first_break"] if trace else None
        for w in worlds:
            p.record(f"EP={w} logprobs bitwise", f"{trs[w]['logprobs_bitwise_equal']}/{trs[w]['logprobs_compared']}")
        p.record("first op breaking parity", first)
    ok = all(t["moe_rows_not_bitwise"] == 0 and t["replay_exact"] and t["max_abs_logprob_delta"] < 1e-3 for t in trs.values())
    res: dict[str, Any] = {
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
        "trainer": {"framework": "torchtitan 0.3.0 Qwen3 + spmd_moe MoE", "tp": main_w, "ep": main_w,
                    "sequence_parallel": main_w > 1, "layout": "sequence" if main_w > 1 else "replicated",
                    "batch_invariant": True, "wall_s": round(walls[main_w], 2)},
        **_trainer_fields(tr),
        "routing_replay_exact": tr["replay_exact"],
        "trainers": {f"ep{w}": {"tp": w, "ep": w, "sequence_parallel": w > 1, "wall_s": round(walls[w], 2),
                                **_trainer_fields(trs[w])} for w in worlds},
        "logprobs_bitwise": all(t["logprobs_bitwise_equal"] == t["logprobs_compared"] for t in trs.values()),
        "first_op_breaking_parity": None if trace is None else {
            "stage": first, "max_abs_delta": trace["first_break_max_abs_delta"], "plan": _plan(first),
            "measured_at": "trainer EP=1 vs generator EP=2 (both batch-invariant), op by op",
        },
        "trace": trace["stages"] if trace else None,
    }
    return res


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
                  "moe_rows_compared", "moe_rows_not_bitwise", "moe_rows_not_bitwise_without_mode",
                  "logprobs_bitwise", "first_op_breaking_parity"):
            print(f"  {k}: {res.get(k)}")
    return 0 if res["ok"] else 1
