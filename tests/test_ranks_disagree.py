"""Ranks that disagree fail in bounded time with a clear DistributedError on EVERY rank.

The MoE layer all-gathers a fixed-size int64 header (axis size, layout, experts, top_k,
dim, config hash, token convention) before any data exchange; every rank compares and
raises the same error. The header exchange itself cannot mismatch (same size on every
rank), so after a disagreement the group stays usable: all the cases of one world size
run one after the other in ONE spawned group (the last case, a rank that skips the
layer, breaks the group on purpose). The last rank is the odd one out in every case.
Each rank records the error type, message and the time it took; the tests assert on
all of them (< 60 s each, in practice milliseconds).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import spmd_moe
from dist_utils import run_ranks
from spmd_moe import MoE
from tp2ep_util import D, make_cfg, world_pctx

LIMIT_S = 60.0


def _layer(layout: str = "replicated", **kw: Any) -> MoE:
    m = MoE(make_cfg(**kw), world_pctx(), layout=layout)
    m.init_states(0)
    return m


def _cases(rank: int, n: int) -> list[tuple[str, Any]]:
    odd = rank == n - 1
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(0))

    def debug_decode_T() -> Any:
        # The decode dispatcher checks the header once (no host sync per step); in
        # debug mode it checks every call, so a later disagreement is caught too.
        m = _layer(dispatcher="all_gather")
        m(x[:4])
        with spmd_moe.debug():
            return m(x[: 2 if odd else 4])

    return [
        ("top_k", lambda: _layer(top_k=1 if odd else 2)(x[:8])),
        ("num_experts", lambda: _layer(num_experts=16 if odd else 8)(x[:8])),
        ("dim", lambda: MoE(make_cfg(dim=8 if odd else D), world_pctx())(x[:8, : 8 if odd else D])),
        ("score_func", lambda: _layer(score_func="sigmoid" if odd else "softmax")(x[:8])),
        ("T_replicated_all_to_all", lambda: _layer(dispatcher="all_to_all")(x[: 6 if odd else 8])),
        ("T_replicated_all_gather", lambda: _layer(dispatcher="all_gather")(x[: 6 if odd else 8])),
        ("T_replicated_auto_prefill_vs_decode", lambda: _layer()(x[: 8 if odd else 257])),
        # One rank would raise PaddingError, the others would pad: the header check comes
        # first, so every rank raises DistributedError instead of one leaving the rest hanging.
        ("padding_error_vs_pad", lambda: _layer(padding="error" if odd else "pad")(x[:5])),
        ("layout", lambda: _layer("sequence" if odd else "replicated")(x[:8])),
        # Same tokens, other gradient convention: a rank returning Partial gradients
        # where the others return complete ones would silently scale the update.
        ("layout_invariant", lambda: _layer("invariant" if odd else "replicated")(x[:8])),
        ("dispatcher", lambda: _layer(dispatcher="all_gather" if odd else "all_to_all")(x[:64])),
        ("sequence_config", lambda: _layer("sequence", top_k=1 if odd else 2)(x[: 3 + rank])),
        ("debug_decode_T_later_call", debug_decode_T),
        ("usable_after", lambda: tuple(_layer()(x[:8]).shape)),
    ]


def disagree_worker(rank: int, world: int, with_skip: bool) -> list[dict[str, Any]]:
    out = []
    for name, fn in _cases(rank, world):
        t0 = time.perf_counter()
        try:
            value = fn()
            rec = {"name": name, "type": "ok", "msg": repr(value)}
        except Exception as e:  # noqa: BLE001 - recorded, asserted by the tests
            rec = {"name": name, "type": type(e).__name__, "msg": str(e)}
        rec["seconds"] = time.perf_counter() - t0
        out.append(rec)
    if with_skip:
        # Last: a rank that never reaches the layer (crashed / took another branch).
        # The others fail in the header exchange within the group timeout.
        t0 = time.perf_counter()
        if rank == world - 1:
            rec = {"name": "peer_skips_layer", "type": "skipped", "msg": ""}
        else:
            try:
                _layer()(torch.randn(8, D))
                rec = {"name": "peer_skips_layer", "type": "ok", "msg": ""}
            except Exception as e:  # noqa: BLE001
                rec = {"name": "peer_skips_layer", "type": type(e).__name__, "msg": str(e)}
        rec["seconds"] = time.perf_counter() - t0
        out.append(rec)
    return out


# Fragments each rank's message must hold: the field, what rank 0 has, what the odd rank has.
EXPECT: dict[str, tuple[str, ...]] = {
    "top_k": ("'top_k'", "rank 0's 2", "got 1 on rank {odd}"),
    "num_experts": ("'num_experts'", "rank 0's 8", "got 16 on rank {odd}", "same checkpoint/config"),
    "dim": ("'dim'", "rank 0's 16", "got 8 on rank {odd}"),
    "score_func": ("'config_hash'", "same MoEConfig"),
    "T_replicated_all_to_all": ("'token_convention'", "rank 0's 8", "got 6 on rank {odd}", "equal T on all ranks"),
    "T_replicated_all_gather": ("'token_convention'", "rank 0's 8", "got 6 on rank {odd}"),
    "T_replicated_auto_prefill_vs_decode": ("'token_convention'", "rank 0's 257", "got 8 on rank {odd}"),
    "padding_error_vs_pad": ("'config_hash'", "same MoEConfig"),
    "layout": ("'layout'", "rank 0's 'replicated'", "got 'sequence' on rank {odd}"),
    "layout_invariant": ("'layout'", "rank 0's 'replicated'", "got 'invariant' on rank {odd}"),
    "dispatcher": ("'config_hash'",),
    "sequence_config": ("'top_k'",),
    "debug_decode_T_later_call": ("'token_convention'", "rank 0's 4", "got 2 on rank {odd}"),
}

_RESULTS: dict[int, list[dict[str, Any]]] = {}


def _results(world: int) -> list[dict[str, Any]]:
    if world not in _RESULTS:
        t0 = time.perf_counter()
        res = run_ranks(disagree_worker, world, True, timeout=150, pg_timeout=20)
        _RESULTS[world] = res
        print(f"world {world}: ranks-disagree run {time.perf_counter() - t0:.1f} s")
    return _RESULTS[world]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_disagree_fail_everywhere_fast(world: int) -> None:
    res = _results(world)
    for rank, r in enumerate(res):
        assert r["ok"], f"rank {rank} crashed or hung: {r['error']}\n{r['tb']}"
    per_rank = [{rec["name"]: rec for rec in r["value"]} for r in res]
    for name, frags in EXPECT.items():
        for rank, recs in enumerate(per_rank):
            rec = recs[name]
            assert rec["type"] == "DistributedError", f"{name} rank {rank}: {rec['type']}: {rec['msg']}"
            msg = rec["msg"]
            for frag in ("ranks disagree on", "axis 'tp'", "expected", "Fix:", *frags):
                frag = frag.format(odd=world - 1)
                assert frag in msg, f"{name} rank {rank}: {frag!r} not in {msg!r}"
            assert rec["seconds"] < LIMIT_S, f"{name} rank {rank}: took {rec['seconds']:.1f} s"
    for rank, recs in enumerate(per_rank):
        assert recs["usable_after"]["type"] == "ok", recs["usable_after"]
        assert recs["usable_after"]["msg"] == repr((8, D))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_peer_that_skips_the_layer_fails_others_in_bounded_time(world: int) -> None:
    res = _results(world)
    for rank in range(world - 1):
        rec = res[rank]["value"][-1]
        assert rec["name"] == "peer_skips_layer"
        assert rec["type"] == "DistributedError", rec
        assert "metadata exchange on axis 'tp'" in rec["msg"] and "Fix:" in rec["msg"], rec["msg"]
        assert rec["seconds"] < LIMIT_S, rec
