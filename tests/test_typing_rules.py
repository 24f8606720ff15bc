"""Each placement rule in typing_rules, computed on a real 2-rank gloo run.

Every rank builds the same *global* tensors from a shared seed, computes the op on its
own placement (its token slice, its experts, its hidden shard, its summand) with the
functions spmd_moe uses, and the rule's claim is checked against the global result:
e.g. "token_count: V -> P" means all_reduce of per-rank counts == counts of all tokens.
Each forbidden input placement is also computed, to show the result is then wrong.
Collectives run twice: with autograd off (torch.distributed) and on (spmd_types).
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
import torch

import typing_rules
from spmd_moe import collectives as C
from spmd_moe.experts import SharedExperts
from spmd_moe.checking import _brand_of, placement_fix
from spmd_moe.router import TopKRouter
from tests.dist_utils import run_distributed

T, D, F_, E, K = 8, 6, 4, 4, 2  # tokens, model dim, hidden dim, experts, top-k


def _global(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (possibly differently sized) tensor along dim 0."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach())
    return torch.cat(parts)


def _sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _rules_on_ranks(rank: int, world: int) -> dict[str, dict[str, float]]:
    import torch.distributed as dist
    import torch.nn.functional as F

    from spmd_moe.config import MoEConfig
    from spmd_moe.dispatch.local import count_per_expert, sort_slots
    from spmd_moe.experts import grouped_mm
    from spmd_moe.moe import _weighted_sum
    from spmd_moe.parallel import ParallelContext

    torch.set_default_dtype(torch.float64)  # exact comparisons up to float64 rounding
    n, r = world, rank
    pctx = ParallelContext.from_group(dist.group.WORLD, "ep")
    sl = slice(r * T // n, (r + 1) * T // n)  # this rank's token slice
    X = _global(0, T, D)  # the replicated (global) tokens
    Xp = [_global(10 + i, T, D) for i in range(n)]  # rank i's summand of a Partial x
    X_loc = X[sl]
    res: dict[str, dict[str, float]] = {}

    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, param_dtype=torch.float64)
    router = TopKRouter(cfg, ParallelContext.single())
    with torch.no_grad():
        router.gate.weight.copy_(_global(1, E, D))
    W = router.gate.weight.detach()

    # gate_matmul: x V, W R -> V (rows of the global logits). Forbidden R: every rank
    # would route all tokens (counts n times); P: the score function is non-linear.
    logits_full = F.linear(X, W)
    res["gate_matmul"] = {
        "err": _err(_gather(F.linear(X_loc, W)), logits_full),
        "forbidden:x_TD=R": _err(_sum(count_per_expert(F.linear(X, W).topk(K).indices, E)),
                                 count_per_expert(logits_full.topk(K).indices, E)),
        "forbidden:x_TD=P": _err(_sum(F.softmax(F.linear(Xp[r], W), -1)),
                                 F.softmax(F.linear(sum(Xp), W), -1)),
    }

    # score_topk: the real router on the slice == rows of the router on all tokens.
    w_loc, ids_loc, s_loc = router(X_loc)
    w_all, ids_all, s_all = router(X)
    res["score_topk"] = {
        "err": max(_err(_gather(s_loc), s_all), _err(_gather(w_loc), w_all),
                   _err(_gather(ids_loc), ids_all)),
        "forbidden:logits_TE=P": _err(_sum(F.softmax(Xp[r], -1)), F.softmax(sum(Xp), -1)),
    }

    # token_count: bincount of this rank's ids is a summand of the global count.
    res["token_count"] = {
        "err": _err(_sum(count_per_expert(ids_loc, E)), count_per_expert(ids_all, E)),
        "forbidden:expert_ids_TK=R": _err(_sum(count_per_expert(ids_all, E)), count_per_expert(ids_all, E)),
    }

    # permute: the dispatcher's expert sort of the slice == the global block-diagonal one.
    order_loc, _ = sort_slots(ids_loc, 0)
    global_order = torch.cat([
        sort_slots(ids_all[i * T // n:(i + 1) * T // n], 0)[0] // K + i * T // n for i in range(n)
    ])
    res["permute"] = {"err": _err(_gather(X_loc[order_loc // K]), X[global_order])}

    # grouped_gemm: my experts' weights x the rows routed to my experts == those rows of
    # the global per-expert product; concatenated in rank order == the global product.
    W1 = _global(2, E, F_, D)
    e0, e1 = r * E // n, (r + 1) * E // n
    order_all = torch.argsort(ids_all.reshape(-1), stable=True)
    rows_all = X[order_all // K]
    counts_all = count_per_expert(ids_all, E)
    mine = slice(int(counts_all[:e0].sum()), int(counts_all[:e1].sum()))
    out_loc = grouped_mm(rows_all[mine], W1[e0:e1], counts_all[e0:e1])
    res["grouped_gemm"] = {"err": _err(_gather(out_loc), grouped_mm(rows_all, W1, counts_all))}

    # swiglu: element-wise, so slice -> slice. Forbidden P: silu(sum) != sum(silu).
    G, U = _global(3, T, F_), _global(4, T, F_)
    res["swiglu"] = {
        "err": _err(_gather(F.silu(G[sl]) * U[sl]), F.silu(G) * U),
        "forbidden:gate_RF=P": _err(_sum(F.silu(Xp[r])), F.silu(sum(Xp))),
    }

    # weighted_combine: the layer's combine on the slice == rows of the global combine.
    slots = _global(5, T, K, D)
    res["weighted_combine"] = {"err": _err(_gather(_weighted_sum(slots[sl], w_all[sl])), _weighted_sum(slots, w_all))}

    # column_parallel / row_parallel: the real SharedExperts (hidden dim sharded) on the
    # replicated tokens; its output summed over ranks == the unsharded SwiGLU MLP.
    cfg_s = MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, shared_hidden_dim=2 * F_, param_dtype=torch.float64)
    se = SharedExperts(cfg_s, pctx)
    w1, w3, w2 = _global(6, 2 * F_, D), _global(7, 2 * F_, D), _global(8, D, 2 * F_)
    f = slice(r * 2 * F_ // n, (r + 1) * 2 * F_ // n)
    with torch.no_grad():
        se.w1.weight.copy_(w1[f]), se.w3.weight.copy_(w3[f]), se.w2.weight.copy_(w2[:, f])
        h_loc = F.silu(se.w1(X)) * se.w3(X)
        h_cols = [None] * n
        dist.all_gather_object(h_cols, h_loc)
        h_full = F.silu(F.linear(X, w1)) * F.linear(X, w3)
        res["column_parallel"] = {"err": _err(torch.cat(h_cols, dim=1), h_full)}  # type: ignore[arg-type]
        y_full = F.linear(h_full, w2)
        res["row_parallel"] = {
            "err": max(_err(C.all_reduce(se(X), pctx), y_full),
                       _err(C.all_reduce(C.partial_from_shards(F.linear(h_loc, w2[:, f]), pctx), pctx), y_full)),
        }

    # rank_view: R -> V, backward V -> P: each rank keeps its own rows of a replicated x;
    # the per-rank gradients of x sum to the gradient of the whole computation.
    xr = X.clone().requires_grad_(True)
    (C.rank_view(xr, pctx)[sl] ** 3).sum().backward()
    xf = X.clone().requires_grad_(True)
    (xf ** 3).sum().backward()
    res["rank_view"] = {"err": _err(_sum(xr.grad), xf.grad)}  # type: ignore[arg-type]

    # the collectives, autograd off (raw torch.distributed) and on (spmd_types)
    counts = torch.tensor([[1, 3], [2, 0]])  # counts[i][j]: rows rank i sends to rank j
    A = [torch.arange(int(counts[i].sum()) * D, dtype=torch.float64).view(-1, D) + 1000 * i for i in range(n)]
    for mode in ("raw", "autograd"):
        grad = mode == "autograd"

        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.clone().requires_grad_(grad)

        with torch.set_grad_enabled(grad):
            res[f"split_tokens/{mode}"] = {
                "err": _err(C.split_tokens(leaf(X), pctx), X_loc),
                # splitting an already split slice: the gathered result lost tokens
                "forbidden:x_TD=V": _err(_gather(C.split_tokens(leaf(X_loc), pctx)), X),
            }
            res[f"all_gather/{mode}"] = {
                "err": _err(C.all_gather(leaf(X_loc), pctx), X),
                "forbidden:x_TD=R": _err(C.all_gather(leaf(X), pctx), X),
            }
            res[f"reduce_scatter/{mode}"] = {
                "err": _err(C.reduce_scatter(leaf(Xp[r]), pctx), sum(Xp)[sl]),
                "forbidden:x_TD=R": _err(C.reduce_scatter(leaf(X), pctx), X_loc),
            }
            res[f"all_reduce/{mode}"] = {
                "err": _err(C.all_reduce(leaf(Xp[r]), pctx), sum(Xp)),
                "forbidden:x=R": _err(C.all_reduce(leaf(X), pctx), X),
            }
            out_splits = [int(counts[j][r]) for j in range(n)]
            got = C.all_to_all(leaf(A[r]), pctx, counts[r].tolist(), out_splits)
            want = torch.cat([A[j].split(counts[j].tolist())[r] for j in range(n)])
            res[f"all_to_all/{mode}"] = {"err": _err(got, want)}
    return res


@pytest.fixture(scope="module")
def computed() -> list[dict[str, dict[str, float]]]:
    return run_distributed(_rules_on_ranks, 2, timeout=180)


def _cases(rule: typing_rules.OpRule) -> list[str]:
    return [f"{rule.name}/raw", f"{rule.name}/autograd"] if rule.collective else [rule.name]


def test_every_rule_is_computed(computed: list[dict[str, dict[str, float]]]) -> None:
    names = {k.split("/")[0] for k in computed[0]}
    assert names == set(typing_rules.RULES)


@pytest.mark.parametrize("name", sorted(typing_rules.RULES))
def test_rule_holds_numerically(name: str, computed: list[dict[str, dict[str, float]]]) -> None:
    rule = typing_rules.RULES[name]
    for rank, res in enumerate(computed):
        for case in _cases(rule):
            # float64; 1e-12 absorbs summation-order rounding of the global reference
            assert res[case]["err"] <= 1e-12, (rank, case, res[case])


@pytest.mark.parametrize("name", sorted(n for n, r in typing_rules.RULES.items() if r.forbidden))
def test_forbidden_placement_gives_a_wrong_result(name: str, computed: list[dict[str, dict[str, float]]]) -> None:
    rule = typing_rules.RULES[name]
    for res in computed:
        for case in _cases(rule):
            for arg, p in rule.forbidden:
                # the forbidden composition differs from the global truth by far more than rounding
                assert res[case][f"forbidden:{arg}={p}"] > 1e-3, (case, arg, p, res[case])


# ---------------------------------------------------------------- rules == signatures


def _brands(fn: Any) -> tuple[dict[str, str], str | None]:
    hints = typing.get_type_hints(fn, include_extras=True)
    ret = hints.pop("return", None)
    params = {k: b.code for k, h in hints.items() if (b := _brand_of(h)) is not None}
    rb = _brand_of(ret) if ret is not None and typing.get_origin(ret) is not tuple else None
    return params, rb.code if rb is not None else None


@pytest.mark.parametrize("name", sorted(n for n, r in typing_rules.RULES.items() if r.call.startswith("spmd_moe.collectives.")))
def test_collective_signature_matches_rule(name: str) -> None:
    rule = typing_rules.RULES[name]
    fn = getattr(C, rule.call.split("spmd_moe.collectives.")[1].split("(")[0])
    params, ret = _brands(fn)
    assert list(params.values()) == [rule.inputs[0][1]], (name, params)
    assert ret == rule.output


def test_layer_signatures_match_rules() -> None:
    router_in, _ = _brands(TopKRouter.forward)
    assert router_in["x_TD"] == typing_rules.input_placement("gate_matmul", "x_TD")
    assert router_in["expert_bias_E"] == typing_rules.input_placement("gate_matmul", "gate_weight_ED")
    shared_in, shared_out = _brands(SharedExperts.forward)
    assert shared_in["x_TD"] == typing_rules.input_placement("column_parallel", "x_TD")
    assert shared_out == typing_rules.rule("row_parallel").output


def test_checker_fix_text_comes_from_rules() -> None:
    for expected, actual in (("R", "P"), ("R", "V"), ("V", "P"), ("P", "V")):
        (op,) = typing_rules.converting_collectives(actual, expected)
        assert op.call in placement_fix(expected, actual)
    assert typing_rules.fix("P", "R") is None  # no single op: the hint explains instead
    assert "counted n times" in placement_fix("P", "R")
