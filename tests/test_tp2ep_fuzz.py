"""Hypothesis fuzz of dispatch -> experts -> combine at world 1, 2 and 4.

The routed experts are replaced by a known map: expert e multiplies its rows by
(e + 1) (rows past the local experts' count stay zero, as grouped_mm leaves them).
Then the layer's output for token t must be  x_t * sum_k w_tk * (id_tk + 1)  with
(w, id) the single-device router's choice: a token lost comes back 0, one duplicated
comes back with a term twice, one sent to the wrong expert or mixed up with another
token comes back with the wrong factor. The load-balance counters must equal the
single-device router's counts (pads never counted).

Hypothesis runs INSIDE every spawned rank with derandomize=True (the seed is derived
from the test's source, the same on every rank), no database and no shrinking, so all
ranks draw the same examples in the same order; each example's draw is also
all-gathered and compared (a divergence fails on every rank at once instead of
hanging). The body never raises; results come back to the parent, which asserts.
Drawn: total T (layout 'replicated') or each rank's own count (layout 'sequence'),
experts per rank, top_k, score function, route_norm, dispatcher, an expert bias that
concentrates the routing, weights and tokens.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from spmd_moe import MoE, MoEConfig, ParallelContext

DIM = 4
TOL = 1e-6


def _scaled_identity(moe: MoE) -> None:
    ex = moe.experts
    start = ex.expert_start

    def forward(routed_RD: torch.Tensor, counts_e: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        ids_R = torch.repeat_interleave(torch.arange(counts_e.numel()), counts_e.long())
        scale_R = torch.zeros(routed_RD.shape[0], dtype=routed_RD.dtype)
        scale_R[: ids_R.numel()] = (start + ids_R + 1).to(routed_RD.dtype)
        return routed_RD * scale_R.unsqueeze(-1)

    ex.forward = forward  # type: ignore[method-assign]


def _one_example(pctx: ParallelContext, ex: dict[str, Any]) -> dict[str, Any]:
    n, rank = pctx.size, pctx.rank
    E = n * ex["per_rank"]
    cfg = MoEConfig(
        dim=DIM, hidden_dim=4, num_experts=E, top_k=min(ex["top_k"], E), score_func=ex["score"],
        route_norm=ex["route_norm"], load_balance_coeff=1e-3, dispatcher=ex["dispatcher"], padding="pad",
    )
    if ex["layout"] == "replicated":
        T = ex["T"]
        lo, hi = 0, T
    else:
        counts = ex["counts"]
        T = sum(counts)
        lo = sum(counts[:rank])
        hi = lo + counts[rank]
    g = torch.Generator().manual_seed(ex["seed"])
    x = torch.randn(T, DIM, generator=g)
    gate = torch.randn(E, DIM, generator=g)
    bias = torch.tensor([float(b) for b in ex["bias"][:E]] + [0.0] * max(0, E - len(ex["bias"])))

    ref = MoE(cfg)
    moe = MoE(cfg, pctx, layout=ex["layout"])
    with torch.no_grad():
        for m in (ref, moe):
            m.router.gate.weight.copy_(gate)
            assert m.expert_bias_E is not None
            m.expert_bias_E.copy_(bias)
    _scaled_identity(moe)
    with torch.no_grad():
        w_TK, ids_TK, _ = ref.router(x, ref.expert_bias_E)
        factor_T = (w_TK * (ids_TK + 1).to(w_TK.dtype)).sum(-1)
        want = x * factor_T.unsqueeze(-1)
        want_counts = torch.bincount(ids_TK.reshape(-1), minlength=E)
    ctx = torch.inference_mode() if ex["inference"] else torch.enable_grad()
    with ctx:
        y = moe(x[lo:hi].clone())
    y = y.detach()
    got_counts = moe.global_tokens_per_expert()
    den = float(want[lo:hi].abs().max()) if hi > lo else 1.0
    err = float((y - want[lo:hi]).abs().max()) / den if hi > lo else 0.0
    return {
        "ok_shape": tuple(y.shape) == (hi - lo, DIM),
        "err": err,
        "counts_ok": bool(torch.equal(got_counts.long(), want_counts)),
    }


def _draw(data: Any, n: int) -> dict[str, Any]:
    from hypothesis import strategies as st

    layout = data.draw(st.sampled_from(["replicated", "sequence"]))
    ex: dict[str, Any] = {
        "layout": layout,
        "per_rank": data.draw(st.integers(1, 3)),
        "top_k": data.draw(st.integers(1, 3)),
        "score": data.draw(st.sampled_from(["softmax", "sigmoid"])),
        "route_norm": data.draw(st.booleans()),
        "dispatcher": data.draw(st.sampled_from(["auto", "all_to_all", "all_gather"])),
        "bias": data.draw(st.lists(st.sampled_from([0, 0, 1]), min_size=0, max_size=12)),
        "inference": data.draw(st.booleans()),
        "seed": data.draw(st.integers(0, 2**16)),
    }
    if layout == "replicated":
        ex["T"] = data.draw(st.integers(0, 4 * n + 3))
    else:
        ex["counts"] = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    return ex


def fuzz_worker(rank: int, world: int, max_examples: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    pctx = ParallelContext.from_group(dist.group.WORLD, name="tp") if world > 1 else ParallelContext.single()
    records: list[dict[str, Any]] = []

    @settings(
        derandomize=True, max_examples=max_examples, database=None, deadline=None,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(st.data())
    def body(data: Any) -> None:
        ex = _draw(data, pctx.size)
        if pctx.size > 1:
            # Every rank must hold the same example: compare a digest of the draw.
            mine = torch.tensor([zlib.crc32(repr(sorted(ex.items())).encode())], dtype=torch.int64)
            everyone = [torch.zeros_like(mine) for _ in range(pctx.size)]
            dist.all_gather(everyone, mine)
            if any(int(e) != int(mine) for e in everyone):
                records.append({"ex": ex, "diverged": True})
                raise RuntimeError("ranks drew different hypothesis examples")
        try:
            rec = _one_example(pctx, ex)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            rec = {"error": f"{type(e).__name__}: {e}"}
        rec["ex"] = ex
        records.append(rec)

    t0 = time.perf_counter()
    body()
    return {"records": records, "seconds": time.perf_counter() - t0}


def _check(records: list[dict[str, Any]], world: int, rank: int) -> list[str]:
    bad = []
    for rec in records:
        if rec.get("diverged"):
            bad.append(f"world {world} rank {rank}: ranks diverged at {rec['ex']}")
        elif "error" in rec:
            bad.append(f"world {world} rank {rank}: {rec['error']} at {rec['ex']}")
        elif not (rec["ok_shape"] and rec["err"] <= TOL and rec["counts_ok"]):
            bad.append(f"world {world} rank {rank}: {rec} ")
    return bad


@pytest.mark.timeout(120)
def test_fuzz_world1() -> None:
    out = fuzz_worker(0, 1, 60)
    bad = _check(out["records"], 1, 0)
    assert not bad, "\n".join(bad[:10])
    assert len(out["records"]) >= 30


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world,examples", [(2, 40), (4, 25)])
def test_fuzz_distributed(world: int, examples: int) -> None:
    t0 = time.perf_counter()
    per_rank = run_distributed(fuzz_worker, world, examples, timeout=300, pg_timeout=30)
    bad = []
    for rank, out in enumerate(per_rank):
        bad += _check(out["records"], world, rank)
    assert not bad, "\n".join(bad[:10]) + f"\n({len(bad)} failures)"
    n_ex = [len(o["records"]) for o in per_rank]
    assert len(set(n_ex)) == 1 and n_ex[0] >= examples // 2, n_ex
    kinds = {(r["ex"]["layout"], r["ex"]["dispatcher"]) for r in per_rank[0]["records"]}
    assert len(kinds) >= 4, f"the fuzz hit too few (layout, dispatcher) pairs: {kinds}"
    print(f"world {world}: {n_ex[0]} examples, {time.perf_counter() - t0:.1f} s wall, in-rank "
          f"{[round(o['seconds'], 1) for o in per_rank]} s")
