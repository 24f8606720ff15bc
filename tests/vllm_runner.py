"""Subprocess script for the vLLM tests: heavy vLLM state stays out of pytest's process.

    python tests/vllm_runner.py --engine SPEC.json --out OUT.json   one engine (spmd_moe.apps.demo)
    python tests/vllm_runner.py --expect-error SPEC.json --out OUT.json
        starts an engine that must fail and records the exception LLM(...) raised
    python tests/vllm_runner.py --load-checks HF_DIR --fused-dir SPMD_DIR --out OUT.json
        builds SpmdQwen3MoeForCausalLM in this process at TP=1 (no engine) and runs
        load_weights on good and broken weight streams.

The ``__main__`` guard matters: vLLM's spawned workers re-import this file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def _build_model(hf_dir: str) -> Any:
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs

    from spmd_moe.integrations.vllm import register
    from spmd_moe.integrations.vllm.model import SpmdQwen3MoeForCausalLM

    register()
    if "_vc" not in _STATE:
        ea = EngineArgs(
            model=hf_dir, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256,
            hf_overrides={"architectures": ["SpmdQwen3MoeForCausalLM"]},
        )
        vc = ea.create_engine_config()
        ctx = set_current_vllm_config(vc)
        ctx.__enter__()
        _STATE["_vc"] = vc
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo",
                distributed_init_method=f"file://{tempfile.mktemp(prefix='spmd_moe_pg_')}",
            )
            ensure_model_parallel_initialized(1, 1)
    # Attention layers register by name: forget the previous build's.
    _STATE["_vc"].compilation_config.static_forward_context.clear()
    with __import__("torch").device("cpu"):
        return SpmdQwen3MoeForCausalLM(vllm_config=_STATE["_vc"], prefix="")


_STATE: dict[str, Any] = {}

# Tiny checkpoints of the other families, made with transformers (config class +
# save_pretrained): head_dim 64 (the CPU attention supports it), fp32, 2 layers, 8 experts.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        vocab_size=512, hidden_size=128, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=None,
    ),
    "qwen2_moe": dict(
        vocab_size=512, hidden_size=128, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
    ),
}
FAMILY_SEED = 0
FAMILY_STD = 0.02


def build_family_checkpoint(family: str, dest: str | Path) -> Path:
    """A tiny HF checkpoint of ``family`` ('mixtral' | 'qwen2_moe') in ``dest`` (built
    once; every tensor from its own generator seeded by its name, norms ~1)."""
    import hashlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(dest)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    cfg = AutoConfig.for_model(family, dtype="float32", hidden_act="silu", **FAMILY_CONFIGS[family])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    sd: dict[str, Any] = {}
    for name, p in sorted(model.state_dict().items()):
        seed = int.from_bytes(hashlib.sha256(f"{FAMILY_SEED}:{family}:{name}".encode()).digest()[:7], "little")
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
        # Norm weights not all ones: a swapped or skipped norm must change the output.
        sd[name] = (1.0 + 0.1 * r if name.endswith("norm.weight") else FAMILY_STD * r).to(torch.float32)
    model.load_state_dict(sd, assign=True, strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def load_checks(hf_dir: str, fused_dir: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from spmd_moe.errors import SpmdMoeError
    from spmd_moe.moe import MoE

    per = load_file(str(Path(hf_dir) / "model.safetensors"))
    fused = load_file(str(Path(fused_dir) / "model.safetensors"))
    out: dict[str, Any] = {}

    # Construction: MoE built on meta, then to_empty + init_states; RoPE cache intact.
    m = _build_model(hf_dir)
    moes = m.moe_layers()
    out["moe_layers"] = sorted(moes)
    out["any_meta"] = any(p.is_meta for p in m.parameters()) or any(b.is_meta for b in m.buffers())
    ref_ok = []
    for name, moe in moes.items():
        fresh = MoE(moe.cfg, moe.pctx, layout="replicated", device="meta", name=moe.name)
        fresh.to_empty(device="cpu")
        fresh.init_states(seed=0)
        ref_ok.append(all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), moe.state_dict().values())))
    out["init_states_applied"] = all(ref_ok)
    out["rope_cache_max_err"] = m.spmd_report()["rope_cache_max_err"]

    # Per-expert names (what save_pretrained writes).
    loaded = m.load_weights(per.items())
    params = dict(m.named_parameters())
    out["per_expert_loaded_all"] = loaded == set(params)
    l0 = "model.layers.0.mlp"
    ex = moes[l0].experts
    out["per_expert_values"] = (
        torch.equal(ex.w1_EFD[3], per[f"{l0}.experts.3.gate_proj.weight"])
        and torch.equal(ex.w3_EFD[3], per[f"{l0}.experts.3.up_proj.weight"])
        and torch.equal(ex.w2_EDF[5], per[f"{l0}.experts.5.down_proj.weight"])
        and torch.equal(moes[l0].router.gate.weight, per[f"{l0}.gate.weight"])
    )
    out["rope_after_load"] = m.spmd_report()["rope_cache_max_err"]
    first = {k: v.clone() for k, v in m.state_dict().items()}

    # Fused transformers-v5 names give the same parameters.
    m2 = _build_model(hf_dir)
    loaded2 = m2.load_weights(fused.items())
    out["fused_loaded_all"] = loaded2 == {n for n, _ in m2.named_parameters()}
    sd2 = m2.state_dict()
    out["fused_equals_per_expert"] = set(sd2) == set(first) and all(torch.equal(first[k], sd2[k]) for k in first)

    def err(items: list[tuple[str, torch.Tensor]]) -> str:
        try:
            _build_model(hf_dir).load_weights(items)
        except SpmdMoeError as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    drop = f"{l0}.experts.5.down_proj.weight"
    out["missing_expert"] = err([(k, v) for k, v in per.items() if k != drop])
    out["both_spellings"] = err(list(per.items()) + [(f"{l0}.experts.down_proj", fused[f"{l0}.experts.down_proj"])])
    out["transposed_fused"] = err(
        [(k, v.transpose(1, 2).contiguous() if k.endswith("gate_up_proj") else v) for k, v in fused.items()]
    )
    out["unexpected_name"] = err(list(per.items()) + [("model.layers.0.mlp.foo.weight", torch.zeros(2))])
    out["missing_q_proj"] = err([(k, v) for k, v in per.items() if k != "model.layers.2.self_attn.q_proj.weight"])
    out["expert_id_out_of_range"] = err(list(per.items()) + [(f"{l0}.experts.8.up_proj.weight", per[f"{l0}.experts.0.up_proj.weight"])])
    out["experts_on_dense_layer"] = err(list(per.items()) + [("model.layers.1.mlp.experts.0.up_proj.weight", per[f"{l0}.experts.0.up_proj.weight"])])
    vc = _STATE["_vc"]
    vc.parallel_config.enable_expert_parallel = True
    try:
        _build_model(hf_dir)
        out["expert_parallel_flag"] = "no error"
    except SpmdMoeError as e:
        out["expert_parallel_flag"] = f"{type(e).__name__}: {e}"
    finally:
        vc.parallel_config.enable_expert_parallel = False
    return out


def expect_error(spec: dict[str, Any]) -> dict[str, Any]:
    """Start an engine that must fail; return the exception LLM(...) raised and the time.

    spec: {"model", "tp", "hf_overrides", "engine": {extra LLM kwargs}, "env": {...}}."""
    import time

    from spmd_moe.apps.demo import _engine_env

    tp = int(spec.get("tp", 1))
    for k, v in {**_engine_env(tp), **spec.get("env", {})}.items():
        os.environ[k] = str(v)
    from vllm import LLM

    kw: dict[str, Any] = {
        "model": spec["model"], "tensor_parallel_size": tp, "dtype": "float32", "enforce_eager": True,
        "skip_tokenizer_init": True, "max_model_len": 256, "max_num_batched_tokens": 256, "max_num_seqs": 4,
        "kv_cache_memory_bytes": 64 << 20, "seed": 0, **spec.get("engine", {}),
    }
    if tp > 1 or int(kw.get("pipeline_parallel_size", 1)) > 1:
        kw["distributed_executor_backend"] = "mp"
    if spec.get("hf_overrides"):
        kw["hf_overrides"] = spec["hf_overrides"]
    t0 = time.perf_counter()
    try:
        LLM(**kw)
    except BaseException as e:  # noqa: BLE001 - the test inspects what the user would see
        return {"raised": True, "type": f"{type(e).__module__}.{type(e).__name__}", "msg": str(e), "s": time.perf_counter() - t0}
    return {"raised": False, "s": time.perf_counter() - t0}


def main(argv: list[str]) -> None:
    if "--expect-error" in argv:
        spec = json.loads(Path(argv[argv.index("--expect-error") + 1]).read_text())
        res = expect_error(spec)
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(res))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if "--load-checks" in argv:
        i = argv.index("--load-checks")
        hf_dir, fused_dir = argv[i + 1], argv[argv.index("--fused-dir") + 1]
        res = load_checks(hf_dir, fused_dir)
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(res))
        sys.stdout.flush()
        os._exit(0)
    from spmd_moe.apps.demo import engine_main

    engine_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
