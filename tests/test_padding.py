"""Token counts that do not split evenly over the expert axis (docs/padding.md).

On real gloo groups (world 2 and 4, one spawned group each, every check inside it):

* padding='pad': T < n (decode: 1 token on 2 or 4 ranks), uneven T and T = 0 on some
  ranks give the single-device result, in both layouts and with both dispatchers; pad
  rows are never counted (each rank's own counter and the global one), so the
  aux-loss-free expert-bias update equals the single-device one;
* padding='error': a PaddingError on EVERY rank, with the documented message (T, n,
  the remainder, the padded T, the fix);
* padding not told (None, the default): the same sizes raise a PaddingError on every
  rank that offers both choices (padding='pad', or make the sizes fit; 'error' to
  refuse explicitly), while sizes that need no padding run;
* the torchtitan #3622 situation (fewer tokens than ranks, so a naive path skips the
  token split and hands the REPLICATED token to the parts that need this rank's slice),
  reproduced in debug mode: the router and both dispatchers stop it with a
  PlacementError naming the tensor, the axis, V vs a likely R and the fix (split the
  tokens and pad T), while the real layer in the same debug mode pads and matches the
  single-device result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import spmd_moe
from dist_utils import run_distributed
from spmd_moe import MoE, PaddingError, PlacementError
from tp2ep_util import D, K, S_HID, build_pair, make_cfg, rel_err, token_slice, world_pctx


def _catch(fn: Any) -> tuple[str, str]:
    try:
        fn()
        return ("ok", "")
    except Exception as e:  # noqa: BLE001 - asserted by the tests
        return (type(e).__name__, str(e))


def padding_worker(rank: int, world: int) -> dict[str, Any]:
    pctx = world_pctx()
    n = world
    out: dict[str, Any] = {"pad": [], "seq_pad": []}
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(7))

    # --- 'pad': T < n and uneven T, layout 'replicated' -------------------------
    for T in sorted({0, 1, n - 1, n + 1, 2 * n + 1, 5}):
        for disp in ("all_to_all", "all_gather"):
            cfg = make_cfg(shared_hidden_dim=S_HID, dispatcher=disp, load_balance_coeff=1e-3, padding="pad")
            full, moe = build_pair(cfg, pctx, "replicated", seed=T)
            with torch.no_grad():
                y_ref = full(x[:T])
                y = moe(x[:T])
                counts = moe.global_tokens_per_expert()
            T_loc = -(-T // n)
            pads_here = max(0, min(T_loc, (rank + 1) * T_loc - T))
            out["pad"].append({
                "T": T, "disp": disp, "err": rel_err(y, y_ref), "shape": tuple(y.shape),
                "global_counts_ok": bool(torch.equal(counts, full.tokens_per_expert_E)),
                "global_sum": float(counts.sum()),
                # This rank's own (Partial) counter: only its real tokens.
                "local_sum": float(moe.tokens_per_expert_E.sum()),
                "local_real": (T_loc - pads_here) * K,
            })
            # The aux-loss-free bias update reads the global counts: pads never counted,
            # so it moves the bias exactly as on one device.
            moe.update_expert_bias()
            full.update_expert_bias()
            assert moe.expert_bias_E is not None and full.expert_bias_E is not None
            out["pad"][-1]["bias_equal"] = bool(torch.equal(moe.expert_bias_E, full.expert_bias_E))

    # --- 'pad': unequal per-rank slices, layout 'sequence' (all-gather paths) ----
    for counts_list in ([0] * (n - 1) + [3], [1] + [0] * (n - 1), list(range(n))):
        T = sum(counts_list)
        for disp, shared in (("all_gather", False), ("all_to_all", True), ("all_gather", True)):
            cfg = make_cfg(shared_hidden_dim=S_HID if shared else None, dispatcher=disp, padding="pad")
            full, moe = build_pair(cfg, pctx, "sequence", seed=T + 1)
            lo = sum(counts_list[:rank])
            hi = lo + counts_list[rank]
            with torch.no_grad():
                y_ref = full(x[:T])[lo:hi]
                y = moe(x[lo:hi])
                counts = moe.global_tokens_per_expert()
            out["seq_pad"].append({
                "counts": counts_list, "disp": disp, "shared": shared, "err": rel_err(y, y_ref),
                "shape": tuple(y.shape), "want_shape": (hi - lo, D),
                "global_counts_ok": bool(torch.equal(counts, full.tokens_per_expert_E)),
                "local_sum": float(moe.tokens_per_expert_E.sum()), "local_real": (hi - lo) * K,
            })

    # --- 'error' and not told (None) ---------------------------------------------------
    def err_layer(layout: str, padding: str | None = "error", **kw: Any) -> MoE[Any]:
        m = MoE(make_cfg(padding=padding, **kw), pctx, layout=layout)
        m.init_states(0)
        return m

    sl = token_slice(5, n, rank)
    out["untold_T1"] = _catch(lambda: err_layer("replicated", None)(x[:1]))
    out["untold_T1_invariant"] = _catch(lambda: err_layer("invariant", None)(x[:1]))
    out["untold_even_ok"] = _catch(lambda: err_layer("replicated", None)(x[: 2 * n]))
    out["untold_seq_shared"] = _catch(lambda: err_layer("sequence", None, shared_hidden_dim=S_HID)(x[sl]))
    out["untold_seq_a2a_uneven_ok"] = _catch(lambda: err_layer("sequence", None, dispatcher="all_to_all")(x[sl]))

    out["error_T1"] = _catch(lambda: err_layer("replicated")(x[:1]))
    out["error_T5"] = _catch(lambda: err_layer("replicated", dispatcher="all_to_all")(x[:5]))
    out["error_even_ok"] = _catch(lambda: err_layer("replicated")(x[: 2 * n]))
    out["error_seq_shared"] = _catch(lambda: err_layer("sequence", shared_hidden_dim=S_HID)(x[sl]))
    out["error_seq_a2a_uneven_ok"] = _catch(lambda: err_layer("sequence", dispatcher="all_to_all")(x[sl]))
    out["error_seq_slices"] = [len(range(40)[token_slice(5, n, r)]) for r in range(n)]

    # --- torchtitan #3622, reproduced in debug mode ----------------------------------
    with spmd_moe.debug():
        cfg = make_cfg(shared_hidden_dim=S_HID, padding="pad")
        full, moe = build_pair(cfg, pctx, "replicated", seed=3)
        # T = 1 < n: the case where a naive path skips the split and hands every rank
        # the same (replicated) token where its own slice belongs.
        x1 = x[:1].clone()
        ids = torch.zeros(1, K, dtype=torch.int64)
        ids[0, 1] = 1
        naive: dict[str, tuple[str, str]] = {}
        naive["router"] = _catch(lambda: moe.router(x1))
        naive["all_to_all_dispatch"] = _catch(lambda: moe.prefill_dispatcher.dispatch(x1, ids, 0))
        naive["all_gather_dispatch"] = _catch(lambda: moe.decode_dispatcher.dispatch(x1, ids, 0))
        # Control: each rank its own token (a real split) passes the same checks.
        own = x[1 + rank : 2 + rank].clone()
        naive["router_own_slice"] = _catch(lambda: moe.router(own))
        out["naive"] = naive
        # The real layer, same debug mode, same T = 1: splits with padding, correct.
        with torch.no_grad():
            y = moe(x1)
            y_ref = full(x1)
        out["debug_real_err"] = rel_err(y, y_ref)
        out["debug_real_counts"] = float(moe.global_tokens_per_expert().sum())
    return out


_RES: dict[int, list[dict[str, Any]]] = {}


def _res(world: int) -> list[dict[str, Any]]:
    if world not in _RES:
        _RES[world] = run_distributed(padding_worker, world, timeout=240, pg_timeout=30)
    return _RES[world]


WORLDS = [2, 4]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_pad_replicated_T_below_and_uneven(world: int) -> None:
    for rank, out in enumerate(_res(world)):
        assert len(out["pad"]) >= 8
        for r in out["pad"]:
            where = f"world {world} rank {rank} {r}"
            assert r["shape"] == (r["T"], D), where
            assert r["err"] <= 1e-6, where
            assert r["global_counts_ok"] and r["global_sum"] == r["T"] * K, where
            assert r["local_sum"] == r["local_real"], where  # pad rows never counted
            assert r["bias_equal"], where  # update_expert_bias == single device


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_pad_sequence_unequal_slices(world: int) -> None:
    for rank, out in enumerate(_res(world)):
        for r in out["seq_pad"]:
            where = f"world {world} rank {rank} {r}"
            assert r["shape"] == r["want_shape"], where
            assert r["err"] <= 1e-6, where
            assert r["global_counts_ok"], where
            assert r["local_sum"] == r["local_real"], where


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_padding_error_on_every_rank(world: int) -> None:
    n = world
    for rank, out in enumerate(_res(world)):
        kind, msg = out["error_T1"]
        assert kind == "PaddingError", (rank, kind, msg)
        for frag in ("token count T=1", "axis 'tp'", f"size {n}", f"a multiple of the axis size n={n}",
                     "got remainder 1", "Fix: pad the batch to T=" + str(n), "MoEConfig(padding='pad')"):
            assert frag in msg, (rank, frag, msg)
        kind, msg = out["error_T5"]
        rem = 5 % n
        assert kind == "PaddingError" and f"remainder {rem}" in msg and f"T={-(-5 // n) * n}" in msg, (rank, msg)
        assert out["error_even_ok"] == ("ok", ""), out["error_even_ok"]
        slices = out["error_seq_slices"]
        kind, msg = out["error_seq_shared"]
        assert kind == "PaddingError", (rank, kind, msg)
        for frag in (f"per-rank token counts {slices}", "layout 'sequence'", "equal per-rank token counts",
                     f"pad every rank's slice to {max(slices)} rows", "MoEConfig(padding='pad')"):
            assert frag in msg, (rank, frag, msg)
        # all_to_all alone takes unequal slices: nothing to pad, no error.
        assert out["error_seq_a2a_uneven_ok"] == ("ok", ""), out["error_seq_a2a_uneven_ok"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_torchtitan_3622_stopped_in_debug_mode(world: int) -> None:
    """The public router and dispatchers fed the same token on every rank (their input
    is documented as this rank's slice) are stopped in debug mode; the local counts of
    replicated tokens stated as Partial are caught by mypy (collective_input), not here."""
    for rank, out in enumerate(_res(world)):
        naive = out["naive"]
        for where in ("router", "all_to_all_dispatch", "all_gather_dispatch"):
            kind, msg = naive[where]
            assert kind == "PlacementError", (rank, where, kind, msg)
            for frag in (f"on axis 'tp' (size {world})", "expected placement V", f"identical tokens on all {world} ranks",
                         "likely R (Replicate)", "#3622", "Fix:", "split_tokens", "pad T to a multiple of the axis size"):
                assert frag in msg, (rank, where, frag, msg)
        assert naive["router_own_slice"] == ("ok", ""), naive["router_own_slice"]
        assert out["debug_real_err"] <= 1e-6
        assert out["debug_real_counts"] == K  # one real token, K slots; the pads not counted


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_padding_not_told_offers_both_choices(world: int) -> None:
    n = world
    for rank, out in enumerate(_res(world)):
        for key, layout in (("untold_T1", "replicated"), ("untold_T1_invariant", "invariant")):
            kind, msg = out[key]
            assert kind == "PaddingError", (rank, key, kind, msg)
            for frag in ("token count T=1", "axis 'tp'", f"layout '{layout}'", f"a multiple of the axis size n={n}",
                         "got remainder 1", "MoEConfig.padding is not set (None)",
                         f"MoEConfig(padding='pad') to let it pad to {n} rows", f"or pad the batch to T={n} rows yourself",
                         "MoEConfig(padding='error')"):
                assert frag in msg, (rank, key, frag, msg)
        slices = out["error_seq_slices"]
        kind, msg = out["untold_seq_shared"]
        assert kind == "PaddingError", (rank, kind, msg)
        for frag in (f"per-rank token counts {slices}", "layout 'sequence'", "MoEConfig.padding is not set",
                     f"pad every rank's slice to {max(slices)} rows yourself", "MoEConfig(padding='pad')"):
            assert frag in msg, (rank, frag, msg)
        # Nothing to pad: no choice needed.
        assert out["untold_even_ok"] == ("ok", ""), out["untold_even_ok"]
        assert out["untold_seq_a2a_uneven_ok"] == ("ok", ""), out["untold_seq_a2a_uneven_ok"]


@pytest.mark.parametrize("padding", ["error", None])
def test_padding_error_never_fires_on_one_rank(padding: str | None) -> None:
    """Any T is a multiple of n = 1: 'error' (or no policy) accepts every count on one device."""
    m = MoE(make_cfg(padding=padding))
    m.init_states(0)
    for T in (0, 1, 3, 7):
        assert m(torch.randn(T, D)).shape == (T, D)
    assert int(m.tokens_per_expert_E.sum()) == (0 + 1 + 3 + 7) * K


@pytest.mark.parametrize("num_experts", [8, 32766, 32767, 40000])
def test_sort_slots_narrow_keys_keep_the_stable_order(num_experts: int) -> None:
    """sort_slots sorts on int16 keys when every id fits (experts 0..E-1 and the pad id E),
    int32 otherwise: the slot order must be the stable order of the ids themselves (token
    order within an expert, pads last), at the edges of the int16 range too."""
    from spmd_moe.dispatch.base import sort_slots

    g = torch.Generator().manual_seed(num_experts)
    T, Kk, pads = 300, 4, 5
    lo = max(0, num_experts - 40)  # ids near the top of the range: where a narrow key would wrap
    ids = torch.randint(lo, num_experts, (T, Kk), generator=g)
    ids[-pads:] = num_experts  # pad tokens carry id E
    order, n_sent = sort_slots(ids, pads, num_experts)
    flat = ids.reshape(-1)
    assert n_sent == (T - pads) * Kk
    assert torch.equal(flat[order], torch.sort(flat).values), "not in expert order"
    for e in flat.unique().tolist():  # stable: within an expert, slots ascending
        slots = order[flat[order] == e]
        assert torch.equal(slots, torch.sort(slots).values), f"expert {e}: token order lost"
