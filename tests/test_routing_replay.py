"""Routing replay: record each token's expert ids per layer in the generator, force them
in the trainer.

The generator is spmd_moe's MoE as vLLM runs it (layout 'replicated', EP=2 over the TP
group, prefill then one-token decode calls, no autograd). The trainer is the same
layer at EP=2 in the sequence layout (each rank its own half of the tokens, autograd
on) whose gate has drifted (as after an optimizer step), so left alone it routes some
tokens differently. Forced to the generator's routes it must record exactly those
routes (torch.equal), and its output must equal a float64 reference that uses the
forced experts (the gate values are recomputed from the trainer's own scores, as
torchtitan's router would with those experts: rtol 1e-5 for fp32 experts).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from typing import Any

import pytest
import torch

import spmd_moe as sm
from spmd_moe.errors import RoutingError
from tests.dist_utils import run_distributed

D, F, E, K = 32, 48, 8, 2
T_PROMPT, N_DECODE = 12, 4


def cfg() -> sm.MoEConfig:
    # padding='pad': the generator's one-token decode steps (T=1 < 2 ranks) need it.
    return sm.MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func="softmax", route_norm=True, padding="pad")


def tokens() -> torch.Tensor:
    return torch.randn(T_PROMPT + N_DECODE, D, generator=torch.Generator().manual_seed(4))


def full_routes(local: list[list[torch.Tensor]]) -> torch.Tensor:
    """Concatenate every call's per-rank chunks (rank order = token order)."""
    calls = [torch.cat([per_rank[c] for per_rank in local]) for c in range(len(local[0]))]
    return torch.cat(calls)


def reference_forced(moe_sd: dict[str, torch.Tensor], x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    d = torch.float64
    gate = moe_sd["router.gate.weight"].to(d)
    w1, w2, w3 = (moe_sd[f"routed_experts.inner_experts.{n}"].to(d) for n in ("w1_EFD", "w2_EDF", "w3_EFD"))
    out = []
    for t in range(x.shape[0]):
        xt = x[t].to(d)
        scores = torch.softmax(gate @ xt, -1)
        w = scores[ids[t]]
        w = w / w.sum()
        y = torch.zeros(D, dtype=d)
        for k, e in enumerate(ids[t].tolist()):
            y = y + w[k] * (w2[e] @ (torch.nn.functional.silu(w1[e] @ xt) * (w3[e] @ xt)))
        out.append(y)
    return torch.stack(out)


def drift(moe: sm.MoE) -> None:
    with torch.no_grad():
        moe.router.gate.weight.add_(0.3 * torch.randn(E, D, generator=torch.Generator().manual_seed(8)))


def _worker(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    pctx = sm.ParallelContext.from_group(dist.group.WORLD)
    x = tokens()
    # Generator: replicated layout, inference, prefill + one-token decode steps.
    gen = sm.MoE(cfg(), pctx, layout="replicated")
    gen.init_states(seed=1, std=0.3)
    gen.record_routes = True
    with torch.inference_mode():
        gen(x[:T_PROMPT])
        for t in range(T_PROMPT, T_PROMPT + N_DECODE):
            gen(x[t : t + 1])
    mine = [r.clone() for r in gen.recorded_routes]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    gen_routes = full_routes(everyone)  # [T, K], every token once, in order

    # Trainer: sequence layout (rank r owns half the tokens), autograd, drifted gate.
    trainer = sm.MoE(cfg(), pctx, layout="sequence")
    trainer.init_states(seed=1, std=0.3)
    drift(trainer)
    T = x.shape[0]
    lo, hi = rank * T // world, (rank + 1) * T // world
    x_loc = x[lo:hi].clone().requires_grad_(True)
    trainer.record_routes = True
    trainer(x_loc)
    free_routes = trainer.recorded_routes.pop()
    trainer.forced_routes_TK = gen_routes[lo:hi]
    y = trainer(x_loc)
    forced_routes = trainer.recorded_routes.pop()
    y.sum().backward()
    assert x_loc.grad is not None
    return {
        "gen_routes": gen_routes, "free": free_routes, "forced": forced_routes, "lo": lo, "hi": hi,
        "y": y.detach(), "x": x,
        "gate_grad": float(trainer.router.gate.weight.grad.abs().sum()) if trainer.router.gate.weight.grad is not None else 0.0,
    }


def test_trainer_reproduces_generator_routing_exactly() -> None:
    res = run_distributed(_worker, 2, timeout=300, pg_timeout=240)
    gen_routes = res[0]["gen_routes"]
    assert gen_routes.shape == (T_PROMPT + N_DECODE, K)
    assert torch.equal(res[1]["gen_routes"], gen_routes)
    n_changed = sum(int((r["free"].sort(-1).values != gen_routes[r["lo"]:r["hi"]].sort(-1).values).any(-1).sum()) for r in res)
    assert n_changed > 0, "the drifted trainer should route some tokens differently when not forced"
    for r in res:
        assert torch.equal(r["forced"], gen_routes[r["lo"]:r["hi"]])  # replayed in the recorded k order
    # Values: the forced trainer equals a float64 loop over the same experts.
    full = sm.MoE(cfg())  # the trainer's weights, unsharded
    full.init_states(seed=1, std=0.3)
    drift(full)
    sd, x = full.state_dict(), res[0]["x"]
    y = torch.cat([r["y"] for r in res])
    ref = reference_forced(sd, x, gen_routes)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    # The router gets a gradient through the forced routes' gate values.
    assert all(r["gate_grad"] > 0 for r in res)


def test_model_level_collect_and_force() -> None:
    """collect_routes / force_routes address layers by name on a whole model."""
    tt = pytest.importorskip("spmd_moe.integrations.torchtitan")
    model = tt.use_spmd_moe(tt.tiny_qwen3_moe_config(), expert_dtype=None).build()
    torch.manual_seed(0)
    model.init_states(buffer_device=torch.device("cpu"))
    tok = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    for m in tt.moe_layers(model).values():
        m.record_routes = True
    with torch.no_grad():
        y0 = model(tok)
    routes = tt.collect_routes(model)
    assert sorted(routes) == ["layers.0.moe", "layers.1.moe"]
    assert all(len(v) == 1 and v[0].shape == (16, 2) for v in routes.values())
    # Force layer 0 to other experts: the output changes; force the recorded ones: it does not.
    other = (routes["layers.0.moe"][0] + 1) % 8
    tt.force_routes(model, {"layers.0.moe": other})
    with torch.no_grad():
        y1 = model(tok)
    assert torch.equal(tt.collect_routes(model)["layers.0.moe"][0], other)
    assert not torch.equal(y1, y0)
    tt.force_routes(model, {k: v[0] for k, v in routes.items()})
    with torch.no_grad():
        y2 = model(tok)
    # Bitwise: the recorded routes keep the router's k order, so the forced gate values
    # are normalized in the same order (any top_k: test_replay_is_bitwise_for_any_top_k).
    assert torch.equal(y2, y0)
    tt.force_routes(model, None)
    assert all(m.forced_routes_TK is None for m in tt.moe_layers(model).values())
    with pytest.raises(sm.ConfigError, match="not spmd_moe MoE layers"):
        tt.force_routes(model, {"layers.9.moe": other})
    # Wrong shapes are refused with the layer's name.
    tt.force_routes(model, {"layers.0.moe": other[:3]})
    with pytest.raises(RoutingError, match="forced_routes_TK"):
        model(tok)


@pytest.mark.parametrize("top_k", [3, 8])
def test_replay_is_bitwise_for_any_top_k(top_k: int) -> None:
    """Routes are recorded in the router's k order and replayed in it, so the gate values
    are normalized in the same order: bitwise equal outputs (with top_k >= 3 a sum of the
    gate values in another order would round differently)."""
    layer = sm.MoE(sm.MoEConfig(dim=32, hidden_dim=16, num_experts=16, top_k=top_k, route_norm=True))
    layer.init_states(seed=3)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    layer.record_routes = True
    with torch.no_grad():
        y_free = layer(x)
    layer.record_routes = False
    layer.forced_routes_TK = layer.recorded_routes[-1]
    with torch.no_grad():
        y_forced = layer(x)
    assert torch.equal(y_forced, y_free)
    # The control: the same routes sorted (another k order) normalize in another order.
    layer.forced_routes_TK = layer.recorded_routes[-1].sort(-1).values
    with torch.no_grad():
        y_sorted = layer(x)
    torch.testing.assert_close(y_sorted, y_free, rtol=1e-5, atol=1e-6)
