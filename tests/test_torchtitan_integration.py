"""torchtitan 0.3.0 model-level integration (spmd_moe.integrations.torchtitan).

References nobody here wrote: torchtitan's own Qwen3 model with torchtitan's own MoE
(torchtitan.models.common.moe.MoE), single process, EP=1 (its EP path needs its
Trainer's mesh context and CUDA-only pieces; its single-process model is the
reference), and torchtitan's own optimizer hook for the expert bias
(register_moe_load_balancing_hook -> _update_expert_bias).

Distributed part: 2 gloo ranks, torchtitan ParallelDims(tp=2, ep=2), torchtitan's own
Qwen3 parallelize (spmd_types backend) for the dense layers, spmd_moe's MoE sharded
over the TP(=EP) group; with and without sequence parallel.

Tolerances. spmd_moe runs the experts in bf16 like torchtitan (same grouped-GEMM
kernel on the same expert-sorted rows, same combine order), so the loss agrees to
fp32 rounding of the TP-split dense layers: rel 1e-5 at every step (measured 1e-7;
AdamW steps move weights by lr-sized amounts, tiny gradient differences stay tiny).
Gradients, relative to the max: router gate 1e-5 (fp32 path; measured 3e-7); dense
parameters reached through the MoE's input gradient 1e-4 (measured 6e-7; the TP
gradient-convention bug this caught gave 3e-2); experts 5e-3 (their backward runs in
bf16, epsilon 3.9e-3; measured 3.7e-4).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from spmd_moe.integrations.torchtitan import (  # noqa: E402
    SpmdMoE,
    choose_layout,
    tiny_qwen3_moe_config,
    use_spmd_moe,
)
from spmd_moe.errors import ConfigError  # noqa: E402
from spmd_moe.moe import MoE  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:In CPU autocast"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

B, L, V = 2, 16, 128
STEPS, LR = 3, 2e-3


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def build_titan(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = tiny_qwen3_moe_config().build()
    m.init_states(buffer_device=torch.device("cpu"))
    return m


def build_ours(**options: Any) -> nn.Module:
    cfg = use_spmd_moe(tiny_qwen3_moe_config(), **options)
    return cfg.build()


class _HookSink:
    """Stands in for torchtitan's OptimizersContainer: keeps the registered pre-hook."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []

    def register_step_pre_hook(self, hook: Any) -> None:
        self.hooks.append(hook)

    def run(self) -> None:
        for h in self.hooks:
            h()


class _NoParallel:
    ep_enabled = False
    tp = 1

    def get_optional_mesh(self, name: Any) -> None:
        return None


def bias_hook(model: nn.Module, parallel_dims: Any) -> _HookSink:
    from torchtitan.components.optimizer.optimizer import register_moe_load_balancing_hook

    sink = _HookSink()
    register_moe_load_balancing_hook(sink, [model], parallel_dims)  # type: ignore[arg-type]
    assert len(sink.hooks) == 1, "torchtitan did not register its expert-bias hook on our model"
    return sink


def ce(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tok.flatten())


# ---------------------------------------------------------------- config / build
def test_use_spmd_moe_on_torchtitan_qwen3_specs() -> None:
    """One call swaps the MoE of torchtitan's own debugmodel_moe and 30B-A3B specs;
    the built model has spmd_moe layers under torchtitan's exact state-dict keys."""
    from torchtitan.models.common.moe import MoE as TitanMoE
    from torchtitan.models.qwen3 import model_registry

    for flavor, n_layers, E in (("debugmodel_moe", 8, 64), ("30B-A3B", 48, 128)):
        theirs_spec = model_registry(flavor)
        ours_spec = use_spmd_moe(model_registry(flavor))
        layers = ours_spec.model.layers
        assert len(layers) == n_layers
        assert all(isinstance(layer.moe, SpmdMoE.Config) for layer in layers)
        with torch.device("meta"):
            if flavor == "debugmodel_moe":
                ours, theirs = ours_spec.model.build(), theirs_spec.model.build()
                assert isinstance(ours.layers["0"].moe, SpmdMoE)
                assert isinstance(theirs.layers["0"].moe, TitanMoE)
                sd_o, sd_t = ours.state_dict(), theirs.state_dict()
                assert sorted(sd_o) == sorted(sd_t)
                assert all(sd_o[k].shape == sd_t[k].shape for k in sd_o)
            else:  # 30B-A3B: one layer is enough to check shapes (meta, no memory)
                moe = layers[0].moe.build()
                assert moe.cfg.num_experts == E and moe.cfg.top_k == 8 and moe.cfg.dim == 2048
                assert moe.cfg.hidden_dim == 768 and moe.cfg.route_norm and moe.cfg.score_func == "softmax"
                assert moe.experts.w1_EFD.shape == (128, 768, 2048)


def test_config_errors() -> None:
    cfg = tiny_qwen3_moe_config()
    with pytest.raises(ConfigError, match="unknown options"):
        use_spmd_moe(cfg, not_an_option=1)
    with pytest.raises(ConfigError, match="expert_dtype"):
        use_spmd_moe(tiny_qwen3_moe_config(), expert_dtype="int8").layers[0].moe.build()

    class PD:
        def __init__(self, tp: int, ep: int) -> None:
            self.tp, self.ep = tp, ep

    assert choose_layout(PD(2, 2), True, False) == "sequence"
    assert choose_layout(PD(2, 2), False, False) == "invariant"  # TP without SP: complete grads
    assert choose_layout(PD(2, 1), False, False) == "invariant"
    assert choose_layout(PD(1, 1), False, False) == "replicated"
    assert choose_layout(PD(1, 2), False, False) == "sequence"
    with pytest.raises(ConfigError, match="expert_parallel_degree == tensor_parallel_degree"):
        choose_layout(PD(4, 2), True, False)
    with pytest.raises(ConfigError, match="shared experts"):
        choose_layout(PD(1, 2), True, True)


def test_state_dict_moves_both_ways_and_outputs_match() -> None:
    """torchtitan -> ours (strict load), then ours (re-initialised) -> torchtitan; the
    logits agree bitwise in both directions."""
    theirs = build_titan(0)
    ours = build_ours()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tok = tokens(1)
    with torch.no_grad():
        y_t, y_o = theirs(tok), ours(tok)
    assert torch.equal(y_o, y_t), f"torchtitan -> ours: max |diff| {float((y_o - y_t).abs().max()):.3e}"
    # Back: new weights in ours (spmd_moe's seeded init), loaded by torchtitan.
    for name, m in ours.named_modules():
        if isinstance(m, MoE):
            m.init_states(seed=5, std=0.05)
    theirs2 = build_titan(3)
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        y_o2, y_t2 = ours(tok), theirs2(tok)
    assert not torch.equal(y_o2, y_o)
    assert torch.equal(y_t2, y_o2), f"ours -> torchtitan: max |diff| {float((y_t2 - y_o2).abs().max()):.3e}"


def test_expert_bias_update_by_torchtitan_hook_matches() -> None:
    """torchtitan's optimizer pre-hook updates our expert_bias_E exactly as it updates
    its own MoE's (same counts, same formula), and resets the counters."""
    theirs = build_titan(0)
    ours = build_ours()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    h_t, h_o = bias_hook(theirs, _NoParallel()), bias_hook(ours, _NoParallel())
    for step in range(2):
        tok = tokens(10 + step)
        ce(theirs(tok), tok).backward()
        ce(ours(tok), tok).backward()
        for (n_t, m_t), (n_o, m_o) in zip(_moes(theirs), _moes(ours)):
            assert torch.equal(m_o.tokens_per_expert_E, m_t.tokens_per_expert_E), n_o
            assert float(m_o.tokens_per_expert_E.sum()) == B * L * 2
        h_t.run()
        h_o.run()
        for (n_t, m_t), (n_o, m_o) in zip(_moes(theirs), _moes(ours)):
            assert torch.equal(m_o.expert_bias_E, m_t.expert_bias_E), n_o
            assert float(m_o.expert_bias_E.abs().max()) > 0
            assert float(m_o.tokens_per_expert_E.abs().sum()) == 0
    # Our own MoE.update_expert_bias is the same formula.
    ours2 = build_ours()
    ours2.load_state_dict(theirs.state_dict(), strict=True)
    tok = tokens(20)
    with torch.no_grad():
        theirs.train()
        theirs(tok)
        ours2(tok)
    h_t.run()
    for (_, m_t), (_, m_o) in zip(_moes(theirs), _moes(ours2)):
        m_o.update_expert_bias()
        assert torch.equal(m_o.expert_bias_E, m_t.expert_bias_E)


def test_tokens_counted_in_training_mode_only_like_torchtitan() -> None:
    theirs = build_titan(0)
    ours = build_ours()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tok = tokens(30)
    for model in (theirs, ours):
        model.eval()
        with torch.no_grad():
            model(tok)
        assert all(float(m.tokens_per_expert_E.sum()) == 0 for _, m in _moes(model))
        model.train()
        with torch.no_grad():
            model(tok)
        assert all(float(m.tokens_per_expert_E.sum()) == B * L * 2 for _, m in _moes(model))
    for (_, a), (_, b) in zip(_moes(theirs), _moes(ours)):
        assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E)


def _moes(model: nn.Module) -> list[tuple[str, Any]]:
    return [(n, blk.moe) for n, blk in model.layers.items() if getattr(blk, "moe_enabled", False)]


def test_torchtitan_moe_backward_with_stride0_grad() -> None:
    """Finding: torchtitan's own MoE backward runs on CPU even with a stride-0 output
    gradient (out.sum()): its GroupedExperts feed torch._grouped_mm with a fresh
    .bfloat16() copy, so the expanded gradient reaches the kernel materialized."""
    theirs = build_titan(0)
    moe = theirs.layers["0"].moe
    x = torch.randn(B, L, 64, requires_grad=True)
    moe(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert moe.routed_experts.inner_experts.w1_EFD.grad is not None


# ---------------------------------------------------------------- distributed training
def reference_run(full_sd: dict[str, torch.Tensor], toks: list[torch.Tensor]) -> dict[str, Any]:
    """torchtitan's own model + MoE, one process: losses per step, step-0 MoE grads,
    expert biases after the last step (torchtitan's hook)."""
    theirs = build_titan(0)
    theirs.load_state_dict(full_sd, strict=True)
    hook = bias_hook(theirs, _NoParallel())
    opt = torch.optim.AdamW(theirs.parameters(), lr=LR)
    losses, grads0 = [], {}
    for step, tok in enumerate(toks):
        opt.zero_grad()
        loss = ce(theirs(tok), tok)
        loss.backward()
        losses.append(float(loss))
        if step == 0:
            grads0 = {k: p.grad.clone() for k, p in theirs.named_parameters() if p.grad is not None}
        hook.run()
        opt.step()
    bias = {n: m.expert_bias_E.clone() for n, m in _moes(theirs)}
    return {"losses": losses, "grads0": grads0, "bias": bias}


def _train_worker(rank: int, world: int, full_sd: dict[str, torch.Tensor], toks: list[torch.Tensor]) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnf
    import torchtitan.distributed.parallel_dims as pdm

    pdm.device_type = "cpu"  # torchtitan falls back to "cuda" without an accelerator
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import get_spmd_context
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

    pd = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=2, pp=1, ep=2, world_size=world)
    pd.build_mesh()
    tp_group = pd.get_mesh("tp").get_group()
    out: dict[str, Any] = {}
    for sp in (True, False):
        cfg = use_spmd_moe(tiny_qwen3_moe_config(), sequence_parallel=sp)
        set_qwen3_sharding_config(cfg, enable_sp=sp, enable_ep=True)  # what torchtitan's update_from_config does
        model = cfg.build()
        model.load_state_dict(full_sd, strict=True)
        full_shapes = {k: p.shape for k, p in model.named_parameters()}
        model.parallelize(pd)
        moe0 = model.layers["0"].moe
        info = {"layout": moe0.layout, "ep": moe0.pctx.size, "experts": moe0.experts.w1_EFD.shape[0],
                "range": (moe0.experts.expert_start, moe0.experts.expert_stop)}
        hook = bias_hook(model, pd)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        ctx = get_spmd_context(parallel_dims=pd)
        losses, grads0 = [], {}
        for step, tok in enumerate(toks):
            opt.zero_grad()
            with ctx():
                logits = model(tok)  # vocab-sharded over TP (torchtitan's loss-parallel layout)
                full = torch.cat(dnf.all_gather(logits.contiguous(), group=tp_group), dim=-1)
                loss = ce(full, tok)
                # Every TP rank computes the same loss; all_gather's backward sums them.
                (loss / world).backward()
            # Some dense parameters replicated over TP get Partial grads from torchtitan's
            # layers (norms under SP, q/k norms on sharded heads); its trainer reduces
            # them elsewhere; sum them here. The MoE's own parameters are complete
            # already (the gate's hook sums it over TP=EP).
            # (Partial ones differ between the ranks; complete ones are identical.)
            for k, p in model.named_parameters():
                if p.grad is not None and ".moe." not in k and p.shape == full_shapes[k]:
                    both = [torch.empty_like(p.grad) for _ in range(world)]
                    dist.all_gather(both, p.grad.contiguous(), group=tp_group)
                    if not torch.equal(both[0], both[1]):
                        p.grad.copy_(both[0] + both[1])
            losses.append(float(loss))
            if step == 0:
                grads0 = {
                    k: p.grad.clone() for k, p in model.named_parameters()
                    if p.grad is not None and (".moe." in k or p.shape == full_shapes[k])
                }
            hook.run()  # torchtitan's _update_expert_bias: all_reduce over TP, then the bias update
            opt.step()
        bias = {n: m.expert_bias_E.clone() for n, m in _moes(model)}
        out["sp" if sp else "nosp"] = {"info": info, "losses": losses, "grads0": grads0, "bias": bias}
    return out


@pytest.mark.timeout(900)
def test_train_tp2_ep2_matches_torchtitan_moe() -> None:
    theirs = build_titan(0)
    full_sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    toks = [tokens(100 + s) for s in range(STEPS)]
    ref = reference_run(full_sd, toks)
    res = run_distributed(_train_worker, 2, full_sd, toks, timeout=800, pg_timeout=600)
    for mode, layout in (("sp", "sequence"), ("nosp", "invariant")):
        for rank, r in enumerate(res):
            got = r[mode]
            assert got["info"]["layout"] == layout and got["info"]["ep"] == 2 and got["info"]["experts"] == 4
            e0, e1 = got["info"]["range"]
            assert (e0, e1) == (4 * rank, 4 * rank + 4)
            # Loss: step 0 to fp32 rounding, later steps after AdamW updates.
            assert abs(got["losses"][0] - ref["losses"][0]) <= 1e-5 * abs(ref["losses"][0]), (mode, got["losses"], ref["losses"])
            for s in range(1, STEPS):
                assert abs(got["losses"][s] - ref["losses"][s]) <= 1e-5 * abs(ref["losses"][s]), (mode, s, got["losses"], ref["losses"])
            assert got["losses"][-1] < got["losses"][0]  # it trains
            for k, g in got["grads0"].items():
                g_ref = ref["grads0"][k]
                if "inner_experts" in k:
                    g_ref = g_ref[e0:e1]
                    tol = 5e-3
                elif ".moe." in k:
                    tol = 1e-5
                else:  # dense, replicated over TP: reached through the MoE's input gradient
                    tol = 1e-4
                assert g.shape == g_ref.shape, k
                assert rel_err(g, g_ref) <= tol, (mode, k, rel_err(g, g_ref))
            for n, b in got["bias"].items():
                # The bias moves by +-coeff per step: equal routing counts give equal bias.
                assert torch.equal(b, ref["bias"][n]), (mode, n, b, ref["bias"][n])
                assert float(b.abs().max()) > 0


# ---------------------------------------------------------------- padding policy
def _padding_worker(rank: int, world: int, full_sd: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, Any]:
    import torch.distributed as dist

    from spmd_moe.errors import PaddingError
    from spmd_moe.integrations.torchtitan import reshard
    from spmd_moe.parallel import ParallelContext

    out: dict[str, Any] = {}
    pctx = ParallelContext.from_group(dist.group.WORLD, "ep")
    for padding in ("pad", "error"):
        moe = use_spmd_moe(tiny_qwen3_moe_config(), padding=padding).layers[0].moe.build()
        moe.load_state_dict(full_sd, strict=True)
        reshard(moe, pctx, "invariant")  # TP without SP: the same 3 tokens on both ranks
        moe.eval()
        try:
            with torch.no_grad():
                out[padding] = moe(x)
        except PaddingError as e:
            out[padding] = str(e)
    # Debug mode verifies the placement the adapter states on torchtitan's untyped tokens:
    # 'invariant' with different tokens per rank (a split that already happened) raises.
    from spmd_moe import debug
    from spmd_moe.errors import SpmdMoeError

    try:
        with debug(), torch.no_grad():
            moe(x[:, :2] + rank)
        out["debug"] = "no error"
    except SpmdMoeError as e:
        out["debug"] = f"{type(e).__name__}: {e}"
    return out


def test_padding_policy_is_stated_and_error_offers_both_choices() -> None:
    """The adapter states its policy (TITAN_PADDING = 'pad', SpmdMoE.Config.padding's
    default); 'pad' runs T=3 tokens on 2 ranks and matches one device; 'error' refuses
    with a message that offers both choices (the core's and the torchtitan option).
    Debug mode verifies the placement the adapter states (Inv) on torchtitan's tokens."""
    from spmd_moe.integrations.torchtitan import TITAN_PADDING

    assert TITAN_PADDING == "pad"
    cfg = use_spmd_moe(tiny_qwen3_moe_config())
    assert all(layer.moe.padding == TITAN_PADDING for layer in cfg.layers)
    assert cfg.layers[0].moe.build().cfg.padding == "pad"  # MoEConfig told explicitly
    with pytest.raises(ConfigError, match="padding='pad'.*padding='error'"):
        use_spmd_moe(tiny_qwen3_moe_config(), padding=None).layers[0].moe.build()
    one = use_spmd_moe(tiny_qwen3_moe_config()).layers[0].moe.build()
    one.init_states(seed=3, std=0.05)
    one.eval()
    full_sd = {k: v.clone() for k, v in one.state_dict().items()}
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = one(x)
    res = run_distributed(_padding_worker, 2, full_sd, x, timeout=300, pg_timeout=240)
    for r in res:
        # Not bitwise: each rank routes its own 2 rows (one a pad) where one device routes
        # all 3, and a CPU GEMM's row result may depend on M (measured here: F.linear rows
        # differ for M <= 3 vs M = 64). The same experts, weights and combine order leave
        # fp32 rounding only: 1e-6 relative is ~10 ulps of headroom.
        torch.testing.assert_close(r["pad"], want, rtol=1e-6, atol=1e-7)
        msg = r["error"]
        assert isinstance(msg, str) and "T=3" in msg, msg
        assert "padding='pad'" in msg and "pad the batch to T=4 rows yourself" in msg, msg
        assert "use_spmd_moe(spec, padding='pad')" in msg, msg
        assert "PlacementError" in r["debug"] and "x_TD (from torchtitan)" in r["debug"], r["debug"]


# ---------------------------------------------------------------- EP drawn from data parallel
def _dp_worker(rank: int, world: int, full_sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    import torchtitan.distributed.parallel_dims as pdm

    pdm.device_type = "cpu"
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import get_spmd_context
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

    pd = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=2, world_size=world)
    pd.build_mesh()
    cfg = use_spmd_moe(tiny_qwen3_moe_config())
    set_qwen3_sharding_config(cfg, enable_sp=False, enable_ep=True)
    model = cfg.build()
    model.load_state_dict(full_sd, strict=True)
    model.parallelize(pd)
    moe0 = model.layers["0"].moe
    tok = tokens(200 + rank)  # every rank its own data
    with get_spmd_context(parallel_dims=pd)():
        loss = ce(model(tok), tok)
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if ".moe." in k and p.grad is not None}
    # The torchtitan flow: build on meta, parallelize, to_empty, init_states.
    cfg2 = use_spmd_moe(tiny_qwen3_moe_config())
    set_qwen3_sharding_config(cfg2, enable_sp=False, enable_ep=True)
    with torch.device("meta"):
        meta_model = cfg2.build()
    meta_model.parallelize(pd)
    meta_model.to_empty(device="cpu")
    meta_model.layers["0"].moe.init_states(buffer_device=torch.device("cpu"))
    m0 = meta_model.layers["0"].moe
    return {
        "layout": moe0.layout, "range": (moe0.experts.expert_start, moe0.experts.expert_stop),
        "loss": float(loss), "grads": grads,
        "meta_shape": tuple(m0.experts.w1_EFD.shape), "meta_is_meta": m0.experts.w1_EFD.is_meta,
        "meta_finite": bool(torch.isfinite(m0.experts.w1_EFD).all()) and float(m0.experts.w1_EFD.std()) > 0,
    }


@pytest.mark.timeout(600)
def test_ep2_from_data_parallel_and_meta_flow() -> None:
    """EP=2 drawn from data parallel (tp=1): layout 'sequence', each rank its own tokens.
    Each rank's loss equals torchtitan's single-process loss on its tokens; the gate
    gradient is that rank's own (data-parallel reduction is the trainer's job); the
    local experts' gradients hold both ranks' tokens (all_to_all backward), i.e. the
    slice of the reference gradient of loss_0 + loss_1. Also the meta -> parallelize ->
    to_empty -> init_states flow gives materialized local shards."""
    theirs = build_titan(0)
    full_sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    res = run_distributed(_dp_worker, 2, full_sd, timeout=500, pg_timeout=400)
    ref_losses, ref_gate = [], []
    theirs.zero_grad()
    for r in range(2):
        tok = tokens(200 + r)
        loss = ce(theirs(tok), tok)
        ref_losses.append(float(loss))
        g = torch.autograd.grad(loss, [theirs.layers["0"].moe.router.gate.weight], retain_graph=True)[0]
        ref_gate.append(g)
        loss.backward()
    for rank, r in enumerate(res):
        assert r["layout"] == "sequence" and r["range"] == (4 * rank, 4 * rank + 4)
        assert abs(r["loss"] - ref_losses[rank]) <= 1e-5 * ref_losses[rank], (r["loss"], ref_losses[rank])
        assert rel_err(r["grads"]["layers.0.moe.router.gate.weight"], ref_gate[rank]) <= 1e-5
        e0, e1 = r["range"]
        for k in ("w1_EFD", "w2_EDF", "w3_EFD"):
            key = f"layers.0.moe.routed_experts.inner_experts.{k}"
            g_ref = dict(theirs.named_parameters())[key].grad[e0:e1]
            assert rel_err(r["grads"][key], g_ref) <= 5e-3, (key, rel_err(r["grads"][key], g_ref))
        assert r["meta_shape"] == (4, 32, 64) and not r["meta_is_meta"] and r["meta_finite"]
