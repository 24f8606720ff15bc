"""vLLM on the CPU: generation tokens/s of the spmd_moe plugin against vLLM's native
Qwen3-MoE on the embedded tiny checkpoint (fp32, eager), at TP=1, and the plugin at
TP=2/EP=2. Each engine runs in its own process (spmd_moe.apps.demo.run_engine_subprocess).

    python -m spmd_moe.apps.bench.vllm_bench --out vllm.json

One timed batch: P prompts of L tokens, N new tokens each (greedy, ignore_eos), repeated
R times in the same engine after a warm-up batch; tokens/s = P*N / median batch time.
The CPU is shared: the figures are ratios from one run, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spmd_moe.apps.bench.vllm_bench")
    p.add_argument("--out", default=None)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-tp2", action="store_true")
    a = p.parse_args(argv)

    from spmd_moe.apps.demo import run_engine_subprocess
    from spmd_moe.apps.tiny_checkpoint import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint()
    rng = random.Random(0)
    vocab = ckpt.spec.vocab_size
    prompts = [[rng.randrange(10, vocab) for _ in range(a.prompt_len)] for _ in range(a.prompts)]
    warm = {"op": "generate", "name": "warm", "prompts": prompts[:2], "max_tokens": 4}
    steps = [warm] + [{"op": "generate", "name": f"r{i}", "prompts": prompts, "max_tokens": a.new} for i in range(a.reps)]
    engines: list[tuple[str, dict[str, Any]]] = [
        ("native_tp1", {"model": str(ckpt.hf_dir), "tp": 1}),
        ("plugin_tp1", {"model": str(ckpt.spmd_dir), "tp": 1, "config_format": "spmd_moe"}),
    ]
    if not a.no_tp2:
        engines.append(("plugin_tp2_ep2", {"model": str(ckpt.spmd_dir), "tp": 2, "config_format": "spmd_moe"}))
    res: dict[str, Any] = {"shape": {"prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new, "reps": a.reps},
                           "engines": {}}
    toks = {}
    for name, spec in engines:
        t0 = time.perf_counter()
        print(f"[vllm-bench] {name} ...", file=sys.stderr, flush=True)
        out = run_engine_subprocess({**spec, "steps": steps}, timeout=900)
        times = [s["s"] for s in out["steps"][1:]]
        med = statistics.median(times)
        gen = a.prompts * a.new
        res["engines"][name] = {"tokens_per_s": gen / med, "batch_s": times, "start_s": out["start_s"],
                                "wall_s": time.perf_counter() - t0}
        toks[name] = [r["tokens"] for r in out["generate"]["r0"]]
        print(f"[vllm-bench] {name}: {gen / med:.1f} tokens/s (batch {med:.2f} s)", file=sys.stderr, flush=True)
    e = res["engines"]
    res["plugin_tp1_over_native"] = e["plugin_tp1"]["tokens_per_s"] / e["native_tp1"]["tokens_per_s"]
    res["tokens_equal_plugin_tp1_native"] = toks["plugin_tp1"] == toks["native_tp1"]
    if "plugin_tp2_ep2" in e:
        res["plugin_tp2_over_native"] = e["plugin_tp2_ep2"]["tokens_per_s"] / e["native_tp1"]["tokens_per_s"]
        res["tokens_equal_plugin_tp2_native"] = toks["plugin_tp2_ep2"] == toks["native_tp1"]
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
