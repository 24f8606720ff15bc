"""vLLM on the CPU: the spmd_moe plugin against native vLLM, same engine settings.

    python -m spmd_moe.apps.bench.vllm_bench --out docs/vllm_cpu_bench.json

Engines (each in its own fresh process, one after the other): vLLM's native
``Qwen3MoeForCausalLM`` and the plugin (``SpmdQwen3MoeForCausalLM``, EP = TP), both at
TP=2 on the embedded tiny Qwen3-MoE checkpoint (fp32, eager), under three settings:

* ``base``: max_num_seqs=48, max_num_batched_tokens=2048;
* ``chunked``: chunked prefill with a 64-token budget (max_num_batched_tokens=64);
* ``seqs5``: max_num_seqs=5.

In every engine: a warm-up, then the mixed batch (48 prompts of 1-300 tokens, 24 new
tokens each, greedy, ignore_eos) ``--reps`` times -> tokens/s = 48*24 / best batch time
(median too); under ``base`` also one request's decode step: (best time of 1+S new
tokens - best time of 1) / S (median too). Best-of-reps because the CPU is shared: the
least disturbed run is the closest to the engine's own speed. Each engine is started
``--rounds`` times (default 2) in alternating order (native, plugin, ...; then the
reverse), and best / median are over the reps of all its rounds, so that load moving over
minutes does not fall on one engine only. The plugin engines also report how many collectives one MoE
layer makes per forward step (a counting wrapper around the layer's communicator, and
every torch.distributed call counted), and the plugin with
SPMD_MOE_VLLM_COMM=torch (gloo on the TP group instead of vLLM's shared-memory
communicator) runs under ``base`` to show what the communicator buys, and the plugin with
SPMD_MOE_VLLM_EXPERTS=spmd (spmd_moe's own expert GEMMs instead of vLLM's CPU
fused-experts op, spmd_moe.integrations.vllm.experts) under ``base`` for what the op buys.
The machine's 1-minute load average is recorded around every engine.

The CPU is shared: compare the ratios within one run, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "base": {"max_num_seqs": 48, "max_num_batched_tokens": 2048},
    "chunked": {"max_num_seqs": 48, "max_num_batched_tokens": 64, "enable_chunked_prefill": True},
    "seqs5": {"max_num_seqs": 5, "max_num_batched_tokens": 2048},
}
MAX_MODEL_LEN = 512


# ----------------------------------------------------------------------------- worker side
class _CountingComm:
    """Wraps the MoE layers' communicator (spmd_moe.comm.Comm) and counts its calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = f"counting({inner.name})"
        self.capturable = inner.capturable
        self.replicated_max_tokens = getattr(inner, "replicated_max_tokens", None)
        self.calls: dict[str, int] = {}

    def _n(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def all_gather(self, x: Any) -> Any:
        self._n("all_gather")
        return self.inner.all_gather(x)

    def reduce_scatter(self, x: Any) -> Any:
        self._n("reduce_scatter")
        return self.inner.reduce_scatter(x)

    def all_reduce(self, x: Any) -> Any:
        self._n("all_reduce")
        return self.inner.all_reduce(x)

    def all_to_all(self, x: Any, in_splits: list[int], out_splits: list[int]) -> Any:
        self._n("all_to_all")
        return self.inner.all_to_all(x, in_splits, out_splits)


_DIST_NAMES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single",
               "all_gather", "broadcast", "barrier")
_STATE: dict[str, Any] = {}
_NATIVE_BLOCKS = ("Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "MixtralMoE")


def worker_install_counters(model: Any) -> dict[str, Any]:
    """apply_model: from now on count each MoE layer's forward calls, its communicator's
    calls, and every torch.distributed collective (any group, vLLM's fallbacks included)."""
    import torch.distributed as dist

    from spmd_moe.moe import MoE

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    native = not moes
    if native:  # vLLM's own sparse blocks: timed only
        moes = [m for m in model.modules() if type(m).__name__ in _NATIVE_BLOCKS]
        if not moes:
            return {"moe_layers": 0}
    counters: list[_CountingComm] = []
    for pctx in ({} if native else {id(m.pctx): m.pctx for m in moes}).values():
        if pctx.comm is None:
            return {"moe_layers": len(moes), "error": "a layer's context has no communicator (TP=1?)"}
        c = _CountingComm(pctx.comm)
        object.__setattr__(pctx, "comm", c)  # measurement only: the frozen context's backend swapped
        counters.append(c)
    forwards: dict[str, Any] = {"calls": 0, "tokens": 0, "s": 0.0, "t0": 0.0, "by_T": {}}

    def hook(module: Any, args: Any) -> None:
        forwards["calls"] += 1
        T = int(args[0].reshape(-1, args[0].shape[-1]).shape[0]) if args else 0
        forwards["tokens"] += T
        forwards["T"] = T
        forwards["t0"] = time.perf_counter()

    def post(module: Any, args: Any, out: Any) -> None:
        dt = time.perf_counter() - forwards["t0"]
        forwards["s"] += dt
        b = forwards["by_T"].setdefault(str(forwards["T"]), [0, 0.0])
        b[0] += 1
        b[1] += dt

    handles = [m.register_forward_pre_hook(hook) for m in moes] + [m.register_forward_hook(post) for m in moes]
    # The whole model's forward too (everything but sampling): what the MoE layers leave.
    whole: dict[str, Any] = {"t0": 0.0, "T": 0, "by_T": {}}

    def model_pre(module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        whole["T"] = int(ids.shape[0]) if ids is not None else -1
        whole["t0"] = time.perf_counter()

    def model_post(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        b = whole["by_T"].setdefault(str(whole["T"]), [0, 0.0])
        b[0] += 1
        b[1] += time.perf_counter() - whole["t0"]

    handles += [model.register_forward_pre_hook(model_pre, with_kwargs=True),
                model.register_forward_hook(model_post, with_kwargs=True)]
    forwards["whole"] = whole
    raw: dict[str, int] = {}
    saved = {k: getattr(dist, k) for k in _DIST_NAMES}

    def wrap(k: str, f: Any) -> Any:
        def g(*a: Any, **kw: Any) -> Any:
            raw[k] = raw.get(k, 0) + 1
            return f(*a, **kw)
        return g

    for k, f in saved.items():
        setattr(dist, k, wrap(k, f))
    _STATE.update(moes=moes, counters=counters, raw=raw, saved=saved, handles=handles, forwards=forwards)
    return {"moe_layers": len(moes), "contexts": len(counters),
            "comm": repr(counters[0].inner) if counters else f"native {type(moes[0]).__name__}"}


def worker_read_counters(model: Any) -> dict[str, Any]:
    """apply_model: what was counted since worker_install_counters; restores everything."""
    import torch.distributed as dist

    if not _STATE:
        return {}
    for k, f in _STATE["saved"].items():
        setattr(dist, k, f)
    for h in _STATE["handles"]:
        h.remove()
    calls: dict[str, int] = {}
    for m in _STATE["moes"]:
        c = getattr(getattr(m, "pctx", None), "comm", None)
        if isinstance(c, _CountingComm):
            object.__setattr__(m.pctx, "comm", c.inner)
    for c in _STATE["counters"]:
        for k, v in c.calls.items():
            calls[k] = calls.get(k, 0) + v
    out = {"comm_calls": calls, "torch_distributed_calls": dict(_STATE["raw"]),
           "moe_forward_calls": _STATE["forwards"]["calls"], "moe_forward_tokens": _STATE["forwards"]["tokens"],
           "moe_forward_s": _STATE["forwards"]["s"],
           "moe_forward_us_by_T": {k: round(1e6 * v[1] / v[0], 1) for k, v in _STATE["forwards"]["by_T"].items()},
           "model_forward_us_by_T": {k: round(1e6 * v[1] / v[0], 1) for k, v in _STATE["forwards"]["whole"]["by_T"].items()},
           "moe_layers": len(_STATE["moes"])}
    _STATE.clear()
    return out


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, [[int(t) for t in o.outputs[0].token_ids] for o in outs]


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine: start, warm up, time the batch (and the decode step), count."""
    from spmd_moe.apps.demo import _engine_env

    tp = int(spec["tp"])
    for k, v in {**_engine_env(tp), **spec.get("env", {})}.items():
        os.environ[k] = str(v)
    from vllm import LLM

    kw: dict[str, Any] = {
        "model": spec["model"], "tensor_parallel_size": tp, "dtype": "float32", "enforce_eager": True,
        "skip_tokenizer_init": True, "max_model_len": MAX_MODEL_LEN, "seed": 0,
        "kv_cache_memory_bytes": 160 << 20, **spec["setting"],
    }
    if tp > 1:
        kw["distributed_executor_backend"] = "mp"
    if spec.get("config_format"):
        kw["config_format"] = spec["config_format"]
    from spmd_moe.apps.bench import vllm_bench as mod  # functions pickled by reference

    t0 = time.perf_counter()
    llm = LLM(**kw)
    res: dict[str, Any] = {"start_s": time.perf_counter() - t0}
    batch = spec["batch"]
    _generate(llm, batch[:4], 4)  # warm-up
    times, tokens = [], []
    for _ in range(int(spec["reps"])):
        dt, toks = _generate(llm, batch, int(spec["new_tokens"]))
        times.append(dt)
        tokens = toks
    res["batch_s"] = times
    # Best of the reps (the run least disturbed by other jobs on a shared CPU) and median.
    res["tokens_per_s"] = len(batch) * int(spec["new_tokens"]) / min(times)
    res["tokens_per_s_median"] = len(batch) * int(spec["new_tokens"]) / statistics.median(times)
    res["tokens"] = tokens
    if spec.get("decode_steps"):
        S = int(spec["decode_steps"])
        one = spec["single"]
        short, long_ = [], []
        for _ in range(int(spec["reps"]) + 1):
            short.append(_generate(llm, [one], 1)[0])
            long_.append(_generate(llm, [one], 1 + S)[0])
        res["single_request"] = {"prompt_len": len(one), "steps": S, "t1_s": short, "t1_plus_steps_s": long_,
                                 "decode_step_ms": 1e3 * (min(long_) - min(short)) / S,
                                 "decode_step_ms_median": 1e3 * (statistics.median(long_) - statistics.median(short)) / S}
    if spec.get("count"):
        installed = llm.apply_model(mod.worker_install_counters)
        _generate(llm, [spec["single"]], 9)  # one prefill + 8 decode steps
        _generate(llm, batch[:6], 4)  # a small mixed batch: prefill steps of several prompts
        res["counters"] = {"installed": installed, "per_rank": llm.apply_model(mod.worker_read_counters)}
    return res


def engine_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = run_engine(spec)
    Path(out_path).write_text(json.dumps(res))
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads can delay interpreter exit


# ----------------------------------------------------------------------------- parent side
def _run_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    import tempfile

    from spmd_moe._subproc import run_in_session

    with tempfile.TemporaryDirectory(prefix="spmd_moe_vbench_") as d:
        sp, op, log = Path(d) / "spec.json", Path(d) / "out.json", Path(d) / "log.txt"
        sp.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "spmd_moe.apps.bench.vllm_bench", "--engine", str(sp), "--engine-out", str(op)]
        with open(log, "w") as f:
            rc = run_in_session(cmd, stdout=f, env=env, timeout=timeout)
        if rc != 0 or not op.exists():
            raise RuntimeError(f"engine {spec['name']} exited {rc}:\n{log.read_text()[-6000:]}")
        out: dict[str, Any] = json.loads(op.read_text())
        return out


def _per_layer_step(counters: dict[str, Any]) -> dict[str, Any]:
    """Collectives per MoE layer forward (rank 0's counts); torch.distributed calls per
    forward step of the model (MoE layer calls / layers)."""
    r0 = counters["per_rank"][0]
    calls, layers = int(r0.get("moe_forward_calls", 0)), int(r0.get("moe_layers", 0))
    if not calls or not layers:
        return {}
    steps = calls / layers
    return {
        "moe_layers": layers, "model_forward_steps": steps, "tokens_per_step": r0["moe_forward_tokens"] / calls,
        "comm_calls_per_moe_layer_call": {k: v / calls for k, v in r0["comm_calls"].items()},
        "moe_layer_us_per_call": 1e6 * r0.get("moe_forward_s", 0.0) / calls,
        "moe_layer_us_by_T": r0.get("moe_forward_us_by_T", {}),
        "model_forward_us_by_T": r0.get("model_forward_us_by_T", {}),
        "torch_distributed_calls_per_model_step": {k: v / steps for k, v in r0["torch_distributed_calls"].items()},
        "comm": counters["installed"][0].get("comm"),
    }


def _merge_rounds(rs: list[dict[str, Any]], batch_tokens: int) -> dict[str, Any]:
    """One engine's rounds as one record: best and median over every timed batch (and
    decode measurement) of every round; the counters and start time of the first round;
    the greedy tokens, checked equal across rounds."""
    r = dict(rs[0])
    r["rounds"] = [{k: x.get(k) for k in ("start_s", "batch_s", "tokens_per_s", "machine_load")}
                   | ({"decode_step_ms": x["single_request"]["decode_step_ms"]} if "single_request" in x else {})
                   for x in rs]
    times = [t for x in rs for t in x["batch_s"]]
    r["batch_s"] = times
    r["tokens_per_s"] = batch_tokens / min(times)
    r["tokens_per_s_median"] = batch_tokens / statistics.median(times)
    r["machine_load"] = [x["machine_load"] for x in rs]
    r["tokens_equal_across_rounds"] = all(x["tokens"] == rs[0]["tokens"] for x in rs)
    if "single_request" in rs[0]:
        sr = dict(rs[0]["single_request"])
        short = [t for x in rs for t in x["single_request"]["t1_s"]]
        long_ = [t for x in rs for t in x["single_request"]["t1_plus_steps_s"]]
        S = int(sr["steps"])
        sr.update(t1_s=short, t1_plus_steps_s=long_,
                  decode_step_ms=1e3 * (min(long_) - min(short)) / S,
                  decode_step_ms_median=1e3 * (statistics.median(long_) - statistics.median(short)) / S)
        r["single_request"] = sr
    return r


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spmd_moe.apps.bench.vllm_bench")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--settings", default="base,chunked,seqs5", help=f"comma list of {sorted(SETTINGS)}")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-prompt-len", type=int, default=300)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="engine starts per engine, in alternating order")
    p.add_argument("--decode-steps", type=int, default=48)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--no-gloo", action="store_true", help="skip the plugin-on-gloo engine")
    p.add_argument("--no-spmd-experts", action="store_true",
                   help="skip the plugin engine with spmd_moe's own expert GEMMs (SPMD_MOE_VLLM_EXPERTS=spmd)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--engine-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.engine:
        return engine_main(a.engine, a.engine_out)

    from spmd_moe.apps.tiny_checkpoint import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint()
    vocab = ckpt.spec.vocab_size
    batch = _prompts(a.prompts, 1, a.max_prompt_len, vocab, seed=0)
    single = _prompts(1, 32, 32, vocab, seed=1)[0]
    common = {"tp": a.tp, "batch": batch, "single": single, "new_tokens": a.new, "reps": a.reps}
    native = {"model": str(ckpt.hf_dir)}
    plugin = {"model": str(ckpt.spmd_dir), "config_format": "spmd_moe"}
    res: dict[str, Any] = {
        "shape": {"prompts": a.prompts, "prompt_len": [1, a.max_prompt_len], "new_tokens": a.new, "reps": a.reps, "rounds": a.rounds,
                  "decode_steps": a.decode_steps, "tp": a.tp, "max_model_len": MAX_MODEL_LEN},
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "note": "shared CPU: compare ratios within this run",
                    "loadavg_1m_5m_15m_at_start": list(os.getloadavg()), "utc_start": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())},
        "settings": {}, "command": "python -m spmd_moe.apps.bench.vllm_bench " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    t_all = time.perf_counter()
    for sname in a.settings.split(","):
        setting = SETTINGS[sname]
        engines: list[tuple[str, dict[str, Any]]] = [
            ("native", {**native, "decode_steps": a.decode_steps if sname == "base" else 0, "count": True}),
            ("plugin", {**plugin, "decode_steps": a.decode_steps if sname == "base" else 0, "count": True}),
        ]
        if sname == "base" and not a.no_gloo:
            engines.append(("plugin_gloo", {**plugin, "env": {"SPMD_MOE_VLLM_COMM": "torch"}, "count": True}))
        if sname == "base" and not a.no_spmd_experts:
            # spmd_moe's own expert GEMMs instead of vLLM's CPU fused-experts op: what the op buys.
            engines.append(("plugin_spmd_experts", {**plugin, "env": {"SPMD_MOE_VLLM_EXPERTS": "spmd"},
                                                    "decode_steps": a.decode_steps, "count": True}))
        out: dict[str, Any] = {"engine_settings": setting, "engines": {}}
        # Rounds in alternating order (native first, then plugin first, ...): on a shared
        # CPU the load moves over minutes, and a fixed order would hand it to one engine.
        rounds: dict[str, list[dict[str, Any]]] = {ename: [] for ename, _ in engines}
        for i in range(a.rounds):
            for ename, spec in (engines if i % 2 == 0 else engines[::-1]):
                print(f"[vllm-bench] {sname} / {ename} (round {i + 1}/{a.rounds}) ...", file=sys.stderr, flush=True)
                load0, t0 = os.getloadavg(), time.strftime("%H:%M:%S", time.gmtime())
                r = _run_subprocess({**common, **spec, "setting": setting, "name": f"{sname}/{ename}"}, a.timeout)
                # The CPU is shared: the 1-minute load average before and after this engine.
                r["machine_load"] = {"utc_start": t0, "loadavg_1m_before": load0[0], "loadavg_1m_after": os.getloadavg()[0]}
                rounds[ename].append(r)
                print(f"[vllm-bench] {sname} / {ename}: {r['tokens_per_s']:.1f} tokens/s"
                      + (f", decode step {r['single_request']['decode_step_ms']:.2f} ms" if "single_request" in r else ""),
                      file=sys.stderr, flush=True)
        for ename, rs in rounds.items():
            r = _merge_rounds(rs, len(batch) * a.new)
            if "counters" in r:
                r["collectives"] = _per_layer_step(r["counters"])
            out["engines"][ename] = r
        e = out["engines"]
        out["plugin_over_native_tokens_per_s"] = e["plugin"]["tokens_per_s"] / e["native"]["tokens_per_s"]
        out["plugin_over_native_tokens_per_s_median"] = e["plugin"]["tokens_per_s_median"] / e["native"]["tokens_per_s_median"]
        out["greedy_tokens_equal"] = e["plugin"]["tokens"] == e["native"]["tokens"]
        if "single_request" in e["plugin"]:
            out["plugin_over_native_decode_step"] = (
                e["plugin"]["single_request"]["decode_step_ms"] / e["native"]["single_request"]["decode_step_ms"]
            )
            out["plugin_over_native_decode_step_median"] = (
                e["plugin"]["single_request"]["decode_step_ms_median"] / e["native"]["single_request"]["decode_step_ms_median"]
            )
        if "plugin_gloo" in e:
            out["plugin_gloo_over_native_tokens_per_s"] = e["plugin_gloo"]["tokens_per_s"] / e["native"]["tokens_per_s"]
        if "plugin_spmd_experts" in e:
            x = e["plugin_spmd_experts"]
            out["plugin_spmd_experts_over_native_tokens_per_s"] = x["tokens_per_s"] / e["native"]["tokens_per_s"]
            out["plugin_spmd_experts_greedy_tokens_equal"] = x["tokens"] == e["native"]["tokens"]
            if "single_request" in x:
                out["plugin_spmd_experts_over_native_decode_step"] = (
                    x["single_request"]["decode_step_ms"] / e["native"]["single_request"]["decode_step_ms"]
                )
        for r in e.values():
            r.pop("tokens", None)
        res["settings"][sname] = out
    res["targets"] = {
        "tokens_per_s_ratio_min": 0.9, "decode_step_ratio_max": 1.25,
        "met": {s: {"tokens_per_s": o["plugin_over_native_tokens_per_s"] >= 0.9,
                    **({"decode_step": o["plugin_over_native_decode_step"] <= 1.25} if "plugin_over_native_decode_step" in o else {})}
                for s, o in res["settings"].items()},
    }
    res["wall_s"] = time.perf_counter() - t_all
    res["machine"]["loadavg_1m_5m_15m_at_end"] = list(os.getloadavg())
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
