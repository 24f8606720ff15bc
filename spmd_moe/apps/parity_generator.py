"""Generator side of ``spmd-moe parity``: the vLLM plugin (SpmdQwen3MoeForCausalLM,
TP=2 = EP=2, layout 'replicated') serving the tiny checkpoint greedily, in
batch-invariant mode, with every MoE layer's inputs, outputs and routes recorded.

    python -m spmd_moe.apps.parity_generator SPEC.json OUT.pt

SPEC: {"model": hf_dir, "prompts": [[ids]], "max_tokens": n, "tp": 2}. OUT (torch.save):
{"sequences": [{"prompt", "tokens", "logprobs"}], "moe": {layer: {"x": [per call],
"y": [per call], "routes": [per rank: [per call]]}}, "start_s", "generate_s"}.
The ``__main__`` guard matters: vLLM's spawned workers re-import this module.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _install(model: Any) -> int:
    """apply_model: record every MoE layer's (input, output) per call, and its routes."""
    layers = model.moe_layers()
    for moe in layers.values():
        moe.record_routes = True
        moe.recorded_routes.clear()
        moe._parity_calls = []

        def hook(mod: Any, inp: Any, out: Any) -> None:
            mod._parity_calls.append((inp[0].detach().clone(), out.detach().clone()))

        moe.register_forward_hook(hook)
    model._parity_tokens = []

    def pre(mod: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        mod._parity_tokens.append((ids.detach().cpu().clone(), pos.detach().cpu().clone()))

    model.register_forward_pre_hook(pre, with_kwargs=True)
    # Op-by-op trace (the trainer compares each stage): outputs of every stage per
    # call, inputs of the stages the trainer can rerun alone. Clones at hook time:
    # vLLM's fused add+RMSNorm works in place on its inputs.
    model._parity_trace = {}
    for name, mod in model.named_modules():
        key = _stage_key(name)
        if key is None:
            continue
        rec = model._parity_trace.setdefault(key, {"out": [], "in": [], "in_res": []})

        def out_hook(m: Any, a: Any, o: Any, rec: Any = rec, key: str = key) -> None:
            if not key.endswith("attn_core"):
                rec["out"].append((o[0] if isinstance(o, tuple) else o).detach().clone())

        def in_hook(m: Any, a: Any, rec: Any = rec, key: str = key) -> None:
            if key.endswith("attn_core"):  # the attention kernel's output = o_proj's input
                rec["out"].append(a[0].detach().clone())
                return
            # Flat lists of tensors only: vLLM's result transport restores tensors in a
            # list but not inside nested tuples.
            if key.endswith(("attn_norm", "ffn_norm", "moe")) or key == "final_norm":
                ts = [t for t in a if isinstance(t, torch.Tensor)]
                rec["in"].append(ts[0].detach().clone())
                if len(ts) > 1:  # fused add + RMSNorm: (hidden, residual)
                    rec["in_res"].append(ts[1].detach().clone())

        mod.register_forward_hook(out_hook)
        mod.register_forward_pre_hook(in_hook)
    from spmd_moe.batch_invariant import is_batch_invariant

    assert is_batch_invariant(), "SPMD_MOE_BATCH_INVARIANT=1 did not reach the vLLM worker"
    return len(layers)


_STAGES = {"input_layernorm": "attn_norm", "self_attn": "attn", "post_attention_layernorm": "ffn_norm", "mlp": "moe"}


def _stage_key(name: str) -> str | None:
    """vLLM module name -> trace stage (the trainer's names: spmd_moe.apps.parity_trainer)."""
    if name == "model.embed_tokens":
        return "embed"
    if name == "model.norm":
        return "final_norm"
    parts = name.split(".")
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _STAGES:
        return f"L{parts[2]}.{_STAGES[parts[3]]}"
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn":
        # Inside attention (this rank's heads): the QKV GEMM's output, o_proj's input.
        return {"qkv_proj": f"L{parts[2]}.qkv", "o_proj": f"L{parts[2]}.attn_core"}.get(parts[4])
    return None


def _fetch(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"__tokens__": [(ids.tolist(), pos.tolist()) for ids, pos in model._parity_tokens]}
    out["__trace__"] = model._parity_trace
    for name, moe in model.moe_layers().items():
        out[name] = {
            "x": [x for x, _ in moe._parity_calls],
            "y": [y for _, y in moe._parity_calls],
            "routes": [r.clone() for r in moe.recorded_routes],
            "rank": moe.pctx.rank,
        }
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    tp = int(spec.get("tp", 2))
    from spmd_moe.apps.demo import _engine_env

    for k, v in _engine_env(tp).items():
        os.environ.setdefault(k, v)
    os.environ["SPMD_MOE_BATCH_INVARIANT"] = "1"  # read at import by the spawned workers
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = dict(
        model=spec["model"], tensor_parallel_size=tp, dtype="float32", enforce_eager=True,
        skip_tokenizer_init=True, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=16,
        kv_cache_memory_bytes=64 << 20, seed=0,
        hf_overrides={"architectures": ["SpmdQwen3MoeForCausalLM"]},
    )
    if tp > 1:
        kw["distributed_executor_backend"] = "mp"
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    # Functions sent to the workers must pickle by reference to an importable module,
    # not to __main__ (this file runs as __main__ under ``python -m``).
    from spmd_moe.apps import parity_generator as mod

    llm.apply_model(mod._install)
    sp = SamplingParams(temperature=0.0, max_tokens=int(spec["max_tokens"]), logprobs=1, ignore_eos=True, seed=0)
    t1 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], sp, use_tqdm=False)
    gen_s = time.perf_counter() - t1
    seqs = []
    for o in outs:
        c = o.outputs[0]
        toks = [int(t) for t in c.token_ids]
        lps = [float(step[t].logprob) for t, step in zip(toks, c.logprobs or [])]
        seqs.append({"prompt": list(o.prompt_token_ids or []), "tokens": toks, "logprobs": lps})
    per_rank = llm.apply_model(mod._fetch)
    by_rank = {r["model.layers.0.mlp"]["rank"]: r for r in per_rank}
    moe: dict[str, Any] = {}
    for name in by_rank[0]:
        if name in ("__tokens__", "__trace__"):
            continue
        moe[name] = {
            "x": by_rank[0][name]["x"],
            "y": by_rank[0][name]["y"],
            "routes": [by_rank[r][name]["routes"] for r in sorted(by_rank)],
        }
    # Per model call: the [T] token ids and positions vLLM scheduled (same on every rank).
    calls = [([int(t) for t in ids], [int(p) for p in pos]) for ids, pos in by_rank[0]["__tokens__"]]
    return {"sequences": seqs, "moe": moe, "calls": calls, "trace": by_rank[0]["__trace__"],
            "start_s": start_s, "generate_s": gen_s, "tp": tp}


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    res = run(spec)
    torch.save(res, argv[1])
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads can delay interpreter exit


if __name__ == "__main__":
    main(sys.argv[1:])
