"""The all-to-all dispatcher's fixed-size exchange (issue 13: no host read in the EP
forward): real gloo groups of 2 and 4 ranks, through the library's own MoE layer.

With ``equal_tokens`` (every rank has T tokens) and SPMD_MOE_EP_SYNC_FREE on (default),
the partial-sum path (kernels='fast', CUDA inference; on the CPU through
PARTIAL_ON_CPU) exchanges exactly T rows per peer: no split sizes, so no host read.
Checked, over layouts, T (0, 1, odd, padded), skewed routings (one expert takes every
token, every token goes to the last rank: the other ranks' experts get nothing):

* no host read in the forward (every .tolist/.item/... counted by patching torch.Tensor)
  and the dispatcher's own counter unchanged;
* three exchanges, each of exactly n*T rows in and out (tokens, ids+gate values,
  fp32 partial sums);
* output against the single-device layer 1e-6 relative in fp32 (the same products; the
  sum over k split per rank and added in rank order: a different order of a handful of
  fp32 adds; the expert GEMMs see the same rows in the same order but a larger,
  worst-case M, which a CPU BLAS may block differently) and against the split-size
  partial-sum path (the same tolerance for the same reason); in bf16 against a float64
  loop 3 bf16 ulps of max|y| (one rounding of the fp32 sum, the bf16 GEMMs round as on
  every path); the load-balance counters exactly;
* inference in ``ep_chunks`` pieces (exchanges overlapping the GEMMs on CUDA): the same
  tolerance, no host read, three exchanges per piece (empty pieces included);
* training (autograd): forward 1e-6 and every gradient (input, router gate, expert
  weights) 1e-5 relative against the single-device layer, no host read in forward +
  backward, three exchanges each way;
* SPMD_MOE_EP_SYNC_FREE=0 and ``equal_tokens`` False: the split-size path (one host
  read, four exchanges);
* SPMD_MOE_EP_RETURN=low: the partial sums return in bf16 (n+1 roundings), 3 bf16 ulps;
* debug mode checks the promise (every rank the same T) on every call: unequal T raises
  DistributedError on every rank, in bounded time.
* the CUDA kernels in Triton's interpreter (subprocess): the count-bounded gather (rows
  past the count not written), the mapped partial sums (undefined rows never leak), the
  gate-value gradients, the sum over ranks (bitwise its torch form), and the whole path
  end to end on gloo, forward and backward.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from dist_utils import run_distributed
from test_ep_overlap import _float64_routed, count_host_reads
from tp2ep_util import D, build_pair, make_cfg, rel_err, world_pctx
from triton_interp import interpreting, rerun, triton_ok

FWD_TOL = 1e-6


def _run(moe: Any, x: torch.Tensor) -> tuple[torch.Tensor, int, list[Any], int]:
    """Output, host reads, exchanges (in shape, dtype, out shape), weighted calls taken."""
    comm = moe.pctx.backend
    orig = comm.all_to_all
    sent: list[Any] = []

    def spy(t: torch.Tensor, ins: list[int], outs: list[int]) -> torch.Tensor:
        y = orig(t, ins, outs)
        sent.append((tuple(t.shape), t.dtype, tuple(y.shape)))
        return y

    disp = moe.prefill_dispatcher
    orig_w = disp.weighted
    taken = {"n": 0}

    def counted(*a: Any, **kw: Any) -> Any:
        r = orig_w(*a, **kw)
        taken["n"] += r is not None
        return r

    comm.all_to_all, disp.weighted = spy, counted
    try:
        with torch.no_grad(), count_host_reads() as reads:
            y = moe(x)
    finally:
        del comm.all_to_all, disp.weighted  # back to the class's methods
    return y, sum(reads.values()), sent, taken["n"]


def _forward_cases(rank: int, n: int) -> list[dict[str, Any]]:
    import spmd_moe.dispatch.all_to_all as a2a

    a2a.PARTIAL_ON_CPU = True
    out: list[dict[str, Any]] = []
    try:
        grid = [(lo, T, sk, torch.float32, 4) for lo in ("sequence", "replicated") for T in (0, 1, 7, 64)
                for sk in ("none", "one_expert", "one_rank")]
        grid += [("sequence", 32, "none", torch.bfloat16, 4), ("replicated", 9, "none", torch.bfloat16, 2)]
        os.environ["SPMD_MOE_EP_LOCAL_FIRST"] = "1"  # local first at every T here ('auto' takes it from 8192 tokens)
        for layout, T, skew, dt, top_k in grid:
            cfg = make_cfg(dispatcher="all_to_all", padding="pad", top_k=top_k, param_dtype=dt,
                           load_balance_coeff=1e-3 if skew != "none" else None)
            full, moe = build_pair(cfg, world_pctx(), layout, 70 + T, skew=skew)
            moe.prefill_dispatcher.equal_tokens = True
            # sequence: every rank its own T tokens (equal counts); replicated: the same T
            # tokens everywhere, split by the layer (padded when n does not divide T).
            x_all = torch.randn(n * T if layout == "sequence" else T, D, generator=torch.Generator().manual_seed(T + 5)).to(dt)
            sl = slice(rank * T, (rank + 1) * T) if layout == "sequence" else slice(0, T)
            with torch.no_grad():
                moe(x_all[sl])  # first call: the header exchange
            reads_before = moe.prefill_dispatcher.host_reads
            moe.tokens_per_expert_E.zero_()
            y, reads, sent, taken = _run(moe, x_all[sl])
            rec: dict[str, Any] = {"layout": layout, "T": T, "skew": skew, "dtype": str(dt), "reads": reads,
                                   "counter": moe.prefill_dispatcher.host_reads - reads_before, "sent": sent, "taken": taken,
                                   "T_rank": T if layout == "sequence" else -(-T // n)}
            with torch.no_grad():
                full.tokens_per_expert_E.zero_()
                y_full = full(x_all)[sl]
                rec["counts_ok"] = bool(torch.equal(moe.global_tokens_per_expert(), full.tokens_per_expert_E))
                os.environ["SPMD_MOE_EP_LOCAL_FIRST"] = "0"  # every segment exchanged (this rank's own too)
                try:
                    y_all_seg, _, rec["sent_all_seg"], _ = _run(moe, x_all[sl])
                finally:
                    os.environ["SPMD_MOE_EP_LOCAL_FIRST"] = "1"
                rec["rel_all_seg" if dt == torch.float32 else "ulps_all_seg"] = (
                    rel_err(y, y_all_seg) if dt == torch.float32 else
                    float((y.double() - y_all_seg.double()).abs().max()) / (max(float(y_all_seg.abs().max()), 1e-30) * 2.0**-8))
                moe.prefill_dispatcher.equal_tokens = False  # the split-size partial-sum path
                y_split, reads_split, sent_split, _ = _run(moe, x_all[sl])
            rec["split_reads"], rec["split_exchanges"] = reads_split, len(sent_split)
            if dt == torch.float32:
                rec["rel"] = rel_err(y, y_full)
                rec["rel_split"] = rel_err(y, y_split)
            else:
                ref = _float64_routed(full, x_all.double())[sl]
                rec["ulps"] = float((y.double() - ref).abs().max()) / (max(float(ref.abs().max()), 1e-30) * 2.0**-8)
            out.append(rec)
        # 'auto' (the default): every segment exchanged below SPMD_MOE_EP_LOCAL_FIRST_TOKENS
        # tokens per rank, local first from there.
        os.environ["SPMD_MOE_EP_LOCAL_FIRST"] = "auto"
        for T, min_tokens in ((8, "9"), (8, "8")):
            os.environ["SPMD_MOE_EP_LOCAL_FIRST_TOKENS"] = min_tokens
            _, moe = build_pair(make_cfg(dispatcher="all_to_all", top_k=4), world_pctx(), "sequence", 4)
            moe.prefill_dispatcher.equal_tokens = True
            x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
            with torch.no_grad():
                moe(x)
            _, _, sent_auto, _ = _run(moe, x)
            out.append({"auto": True, "min_tokens": int(min_tokens), "T": T, "rows": [s_[0][0] for s_ in sent_auto]})
        del os.environ["SPMD_MOE_EP_LOCAL_FIRST_TOKENS"]
        os.environ["SPMD_MOE_EP_LOCAL_FIRST"] = "1"
        # SPMD_MOE_EP_RETURN=low: the partial sums go back in bf16 (the layer's dtype),
        # rounded per rank, then summed in fp32 and rounded again: n+1 roundings, the same
        # 3 bf16 ulps of max|y| against the float64 loop; the return exchange is bf16.
        os.environ["SPMD_MOE_EP_RETURN"] = "low"
        try:
            for layout, T in (("sequence", 32), ("replicated", 9)):
                cfg = make_cfg(dispatcher="all_to_all", padding="pad", top_k=4, param_dtype=torch.bfloat16)
                full, moe = build_pair(cfg, world_pctx(), layout, 30 + T)
                moe.prefill_dispatcher.equal_tokens = True
                x_all = torch.randn(n * T if layout == "sequence" else T, D, generator=torch.Generator().manual_seed(T + 8)).to(torch.bfloat16)
                sl = slice(rank * T, (rank + 1) * T) if layout == "sequence" else slice(0, T)
                with torch.no_grad():
                    moe(x_all[sl])
                y, reads, sent, taken = _run(moe, x_all[sl])
                ref = _float64_routed(full, x_all.double())[sl].detach()
                ulps = float((y.double() - ref).abs().max()) / (max(float(ref.abs().max()), 1e-30) * 2.0**-8)
                out.append({"low_return": True, "layout": layout, "T": T, "ulps": ulps, "reads": reads, "taken": taken,
                            "return_dtype": sent[2][1] if len(sent) == 3 else None})
        finally:
            del os.environ["SPMD_MOE_EP_RETURN"]
        # Inference in pieces (ep_chunks): every piece its own fixed-size exchanges; 5
        # pieces of 7 tokens leave some empty.
        for layout, T, chunks in (("sequence", 7, 5), ("sequence", 33, 2), ("replicated", 20, 3), ("sequence", 0, 2)):
            cfg = make_cfg(dispatcher="all_to_all", padding="pad", top_k=4, ep_chunks=chunks)
            full, moe = build_pair(cfg, world_pctx(), layout, 50 + T)
            moe.prefill_dispatcher.equal_tokens = True
            x_all = torch.randn(n * T if layout == "sequence" else T, D, generator=torch.Generator().manual_seed(T + 6))
            sl = slice(rank * T, (rank + 1) * T) if layout == "sequence" else slice(0, T)
            with torch.no_grad():
                moe(x_all[sl])
            y, reads, sent, taken = _run(moe, x_all[sl])
            with torch.no_grad():
                err = rel_err(y, full(x_all)[sl])
            out.append({"pieces": chunks, "layout": layout, "T": T, "rel": err, "reads": reads, "exchanges": len(sent), "taken": taken})
        # Where it must not apply even with equal_tokens: the bitwise row path runs instead.
        import spmd_moe

        gates: dict[str, int] = {}
        xg = torch.randn(12, D, generator=torch.Generator().manual_seed(1 + rank))
        for name, kw, ctx in (("fast", {}, "no_grad"), ("fast_train", {}, "grad"), ("torchtitan", dict(kernels="torchtitan"), "no_grad"),
                              ("train_chunks2", dict(ep_chunks=2), "grad"), ("debug", {}, "debug"), ("batch_invariant", {}, "bi")):
            _, mg = build_pair(make_cfg(dispatcher="all_to_all", **kw), world_pctx(), "sequence", 2)
            mg.prefill_dispatcher.equal_tokens = True
            calls = {"n": 0}
            orig_w = mg.prefill_dispatcher.weighted

            def counted(*a: Any, _o: Any = orig_w, _c: Any = calls, **kw2: Any) -> Any:
                r = _o(*a, **kw2)
                _c["n"] += r is not None
                return r

            mg.prefill_dispatcher.weighted = counted
            if ctx == "grad":
                mg(xg.clone().requires_grad_(True))
            elif ctx == "debug":
                with torch.no_grad(), spmd_moe.debug():
                    mg(xg)
            elif ctx == "bi":
                with torch.no_grad(), spmd_moe.batch_invariant_mode():
                    mg(xg)
            else:
                with torch.no_grad():
                    mg(xg)
            gates[name] = calls["n"]
        out.append({"gates": gates})
        # The switch: SPMD_MOE_EP_SYNC_FREE=0 takes the split-size path even with equal_tokens.
        _, moe = build_pair(make_cfg(dispatcher="all_to_all", top_k=4), world_pctx(), "sequence", 3)
        moe.prefill_dispatcher.equal_tokens = True
        x = torch.randn(12, D, generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            moe(x)
        os.environ["SPMD_MOE_EP_SYNC_FREE"] = "0"
        try:
            _, reads_off, sent_off, _ = _run(moe, x)
        finally:
            del os.environ["SPMD_MOE_EP_SYNC_FREE"]
        out.append({"switch_off": True, "reads": reads_off, "exchanges": len(sent_off)})
    finally:
        a2a.PARTIAL_ON_CPU = False
        os.environ.pop("SPMD_MOE_EP_LOCAL_FIRST", None)
    return out


def _training_cases(rank: int, n: int) -> list[dict[str, Any]]:
    """Forward + backward (autograd) through the fixed-size path against the single-device
    layer: output, input gradient, router gate and every expert weight gradient."""
    import torch.distributed as dist

    import spmd_moe.dispatch.all_to_all as a2a
    from test_ep_overlap import _gather_cat

    a2a.PARTIAL_ON_CPU = True
    out: list[dict[str, Any]] = []
    try:
        for layout, T, skew, top_k in [(lo, T, sk, 4) for lo in ("sequence", "replicated") for T in (0, 1, 7, 33)
                                       for sk in ("none", "one_expert", "one_rank")] + [("sequence", 16, "none", 2)]:
            cfg = make_cfg(dispatcher="all_to_all", padding="pad", top_k=top_k, load_balance_coeff=1e-3 if skew != "none" else None)
            full, moe = build_pair(cfg, world_pctx(), layout, 90 + T, skew=skew)
            moe.prefill_dispatcher.equal_tokens = True
            x_all = torch.randn(n * T if layout == "sequence" else T, D, generator=torch.Generator().manual_seed(T + 9))
            gy_all = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(T + 10))
            sl = slice(rank * T, (rank + 1) * T) if layout == "sequence" else slice(0, T)
            xr = x_all.clone().requires_grad_(True)
            yr = full(xr)
            (yr * gy_all).sum().backward()
            with torch.no_grad():
                moe(x_all[sl])  # first call: the header exchange
            comm = moe.pctx.backend
            orig = comm.all_to_all
            sent: list[Any] = []

            def spy(t: torch.Tensor, ins: list[int], outs: list[int]) -> torch.Tensor:
                y = orig(t, ins, outs)
                sent.append((tuple(t.shape), tuple(y.shape)))
                return y

            comm.all_to_all = spy
            xi = x_all[sl].clone().requires_grad_(True)
            scale = n if layout == "replicated" else 1  # every rank holds all T tokens' output there
            try:
                with count_host_reads() as reads:
                    y = moe(xi)
                    ((y * gy_all[sl]).sum() / scale).backward()
            finally:
                del comm.all_to_all
            gx = xi.grad.clone() if xi.grad is not None else torch.zeros_like(xi)
            if layout == "replicated":
                dist.all_reduce(gx)
            gate = moe.router.gate.weight.grad
            gate = gate.clone() if gate is not None else torch.zeros_like(moe.router.gate.weight)
            dist.all_reduce(gate)
            errs = {"fwd": rel_err(y.detach(), yr.detach()[sl]), "grad_x": rel_err(gx, xr.grad[sl]),
                    "grad_gate": rel_err(gate, full.router.gate.weight.grad)}
            for pname in ("w1_EFD", "w2_EDF", "w3_EFD"):
                g = getattr(moe.experts, pname).grad
                g = g if g is not None else torch.zeros_like(getattr(moe.experts, pname))
                errs[pname] = rel_err(_gather_cat(g, 0), getattr(full.experts, pname).grad)
            out.append({"layout": layout, "T": T, "skew": skew, "top_k": top_k, "errs": errs,
                        "reads": sum(reads.values()), "sent": sent})
    finally:
        a2a.PARTIAL_ON_CPU = False
    return out


def worker(rank: int, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = {"fwd": _forward_cases(rank, n), "train": _training_cases(rank, n)}
    res["seconds"] = time.perf_counter() - t0
    return res


_CACHE: dict[int, list[dict[str, Any]]] = {}


def _results(n: int) -> list[dict[str, Any]]:
    if n not in _CACHE:
        _CACHE[n] = run_distributed(worker, n, timeout=300, pg_timeout=30)  # bounded time on a hang
        print(f"world {n}: {[round(r['seconds'], 1) for r in _CACHE[n]]} s per rank")
    return _CACHE[n]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n", [2, 4])
def test_fixed_size_forward_has_no_host_read(n: int) -> None:
    bad = []
    for rank, r in enumerate(_results(n)):
        for c in r["fwd"]:
            if c.get("pieces"):
                w = f"world {n} rank {rank} {c['layout']} T={c['T']} pieces={c['pieces']}"
                if c["rel"] > FWD_TOL or c["reads"] or c["taken"] != 1 or c["exchanges"] != 3 * c["pieces"]:
                    bad.append(f"{w}: rel {c['rel']:.3g}, {c['reads']} reads, taken {c['taken']}, {c['exchanges']} exchanges")
                continue
            if c.get("low_return"):
                w = f"world {n} rank {rank} {c['layout']} T={c['T']} SPMD_MOE_EP_RETURN=low"
                if c["ulps"] > 3.0 or c["reads"] or c["taken"] != 1 or c["return_dtype"] != torch.bfloat16:
                    bad.append(f"{w}: {c['ulps']:.2f} ulps, {c['reads']} reads, taken {c['taken']}, return {c['return_dtype']}")
                continue
            if "gates" in c:
                want = {"fast": 1, "fast_train": 1, "torchtitan": 0, "train_chunks2": 0, "debug": 0, "batch_invariant": 0}
                if c["gates"] != want:
                    bad.append(f"world {n} rank {rank}: taken where it must not be (or not where it must): {c['gates']}")
                continue
            if c.get("auto"):
                want = (n if c["T"] < c["min_tokens"] else n - 1) * c["T"]
                if c["rows"] != [want] * 3:
                    bad.append(f"world {n} rank {rank}: auto, T={c['T']}, from {c['min_tokens']} tokens: exchanged rows {c['rows']}, expected {want}")
                continue
            if c.get("switch_off"):
                if c["reads"] != 1 or c["exchanges"] != 4:
                    bad.append(f"world {n} rank {rank}: SPMD_MOE_EP_SYNC_FREE=0: {c['reads']} reads, {c['exchanges']} exchanges")
                continue
            where = f"world {n} rank {rank} {c['layout']} T={c['T']} skew={c['skew']} {c['dtype']}"
            if c["taken"] != 1:
                bad.append(f"{where}: the fixed-size path was not taken")
            if c["reads"] or c["counter"]:
                bad.append(f"{where}: {c['reads']} host reads (counter {c['counter']}) in the forward")
            # Local first: the peers' segments only ((n-1)*T rows each way); with
            # SPMD_MOE_EP_LOCAL_FIRST=0 every segment, this rank's own too (n*T).
            for key, N in (("sent", (n - 1) * c["T_rank"]), ("sent_all_seg", n * c["T_rank"])):
                if len(c[key]) != 3 or any(s[0][0] != N or s[2][0] != N for s in c[key]) or c[key][2][1] != torch.float32:
                    bad.append(f"{where}: {key}: exchanges (in shape, dtype, out shape) {c[key]}, expected {N} rows each")
            if c["split_reads"] != 1 or c["split_exchanges"] != 4:
                bad.append(f"{where}: split-size path: {c['split_reads']} reads, {c['split_exchanges']} exchanges")
            if not c["counts_ok"]:
                bad.append(f"{where}: counters differ from the single-device layer")
            # Local first against every segment exchanged: the same sums; the GEMMs see other
            # row groupings, which a CPU BLAS may block differently (FWD_TOL; in bf16 1 ulp
            # of max|y|: one rounding of a sum that may differ in its last fp32 bits).
            for key, tol in (("rel", FWD_TOL), ("rel_split", FWD_TOL), ("ulps", 3.0), ("rel_all_seg", FWD_TOL), ("ulps_all_seg", 1.0)):
                if key in c and c[key] > tol:
                    bad.append(f"{where}: {key} {c[key]:.3g} > {tol}")
    assert not bad, "\n".join(bad[:20])


# ------------------------------------------------------------------ the CUDA kernels, in Triton's interpreter
IN_INTERPRETER = interpreting("SPMD_MOE_DECODE_INTERPRET")


@pytest.mark.skipif(torch.cuda.is_available() or IN_INTERPRETER or not triton_ok(), reason="CPU with Triton only, once")
def test_fixed_size_kernels_in_triton_interpreter() -> None:
    """Triton reads TRITON_INTERPRET at its first import: a fresh interpreter runs the
    kernel tests below (the count-bounded gather, the mapped partial sums, the sum over
    ranks, and the fixed-size path with all three end to end on gloo, world 2)."""
    out = rerun(__file__, "SPMD_MOE_DECODE_INTERPRET", "SPMD_MOE_FUSED_BWD_INTERPRET", k="interp_fixed", timeout=600)
    assert "8 passed" in out, out[-2000:]


_ON_KERNEL = pytest.mark.skipif(not (IN_INTERPRETER or torch.cuda.is_available()), reason="runs in the interpreter subprocess above (or on CUDA)")


@_ON_KERNEL
def test_interp_fixed_gather_stops_at_the_device_count() -> None:
    """Rows below the count: the gathered rows, bitwise (a copy); the rows past it are not
    written (the output is pre-filled through torch.empty's cache here: checked by
    gathering into a buffer that the kernel must leave as it was)."""
    from spmd_moe.dispatch import _partial_combine as pc

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    programs = pc._GATHER_PROGRAMS
    for N, Kk, Dd, count, progs in ((11, 4, 80, 17, programs), (11, 4, 80, 17, 3), (6, 2, 2048, 12, 5),
                                    (5, 4, 16, 0, programs), (0, 4, 16, 0, programs)):
        pc._GATHER_PROGRAMS = progs  # 3 or 5: each program loops over several rows
        src = torch.randn(N, Dd, generator=g).to(dev)
        M = N * Kk
        idx = torch.randperm(M, generator=g).to(dev)
        assert pc.use_kernel(src)
        sentinel = torch.full((M, Dd), 7.0, device=dev)
        orig_empty = torch.empty
        try:
            torch.empty = lambda *a, **kw: sentinel  # type: ignore[assignment]  # the kernel's output buffer
            got = pc.gather_rows(src, idx, Kk, torch.tensor([count], device=dev))
        finally:
            torch.empty = orig_empty  # type: ignore[assignment]
        assert torch.equal(got[:count], src[idx[:count] // Kk]), (N, Kk, Dd)
        assert bool((got[count:] == 7.0).all()), "rows past the count were written"
        # Scaled (the slot rows' gradient w * g): fp32 product, one rounding, as the torch form.
        scale = torch.rand(M, generator=g).to(dev)
        got_s = pc.gather_rows(src, idx, Kk, torch.tensor([count], device=dev), scale_X=scale)
        assert torch.equal(got_s[:count], src[idx[:count] // Kk] * scale[idx[:count]].unsqueeze(-1)), (N, Kk, Dd)
    pc._GATHER_PROGRAMS = programs


@_ON_KERNEL
def test_interp_fixed_slot_weight_grads_match_torch() -> None:
    """The gate values' gradient <g[t], row(slot t*K+k)> (kernel) against a float64 loop:
    fp32 dot products (1e-6 relative of the largest), 0 for slots without a row even
    where the rows past the count are NaN; K not a power of two."""
    from spmd_moe.dispatch import _partial_combine as pc

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    for N, Kk, Dd in ((13, 4, 80), (5, 6, 2048), (0, 4, 16)):
        X = N * Kk
        R = X // 2
        rows = torch.randn(R + 3, Dd, generator=g)
        rows[R:] = float("nan")
        slots = torch.randperm(X, generator=g)[:R]
        row_of_slot = torch.full((X,), -1, dtype=torch.int64)
        row_of_slot[slots] = torch.arange(R)
        gr = torch.randn(N, Dd, generator=g)
        got = pc.slot_weight_grads(gr.to(dev), rows.to(dev), row_of_slot.to(dev), Kk).cpu()
        ref = torch.zeros(N, Kk, dtype=torch.float64)
        for t in range(N):
            for k in range(Kk):
                r = int(row_of_slot[t * Kk + k])
                if r >= 0:
                    ref[t, k] = float((gr[t].double() * rows[r].double()).sum())
        assert got.shape == (N, Kk) and bool(torch.isfinite(got).all())
        if N:
            assert rel_err(got, ref.float()) <= 1e-6


@_ON_KERNEL
def test_interp_fixed_partial_sums_mapped_match_torch() -> None:
    """The mapped partial sums (kernel) against their torch form: rows that no slot maps
    to are NaN (the GEMMs leave them undefined) and must not leak; fp32, 1e-6 relative
    (the kernel may fuse the multiply and add)."""
    from spmd_moe.dispatch import _partial_combine as pc

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    for N, Kk, Dd in ((13, 4, 80), (4, 8, 2048), (0, 4, 16)):
        X = N * Kk
        R = X // 2
        M = R + 5  # 5 undefined rows past the count
        rows = torch.randn(M, Dd, generator=g)
        rows[R:] = float("nan")
        slots = torch.randperm(X, generator=g)[:R]
        row_of_slot = torch.full((X,), -1, dtype=torch.int64)
        row_of_slot[slots] = torch.arange(R)
        w = torch.rand(N, Kk, generator=g)
        got = pc.partial_sums_mapped(rows.to(dev), row_of_slot.to(dev), w.to(dev)).cpu()
        ref = torch.zeros(N, Dd, dtype=torch.float64)
        for t in range(N):
            for k in range(Kk):
                r = int(row_of_slot[t * Kk + k])
                if r >= 0:
                    ref[t] += float(w[t, k]) * rows[r].double()
        assert got.shape == (N, Dd) and bool(torch.isfinite(got).all())
        if N:
            assert rel_err(got, ref.float()) <= 1e-6


@_ON_KERNEL
def test_interp_fixed_sum_over_ranks_at_matches_torch() -> None:
    """The sender's sum (kernel) against its torch form, bitwise: the same fp32 adds in
    rank order, one rounding; tokens sent to every rank, to some, to none (pads)."""
    from spmd_moe.dispatch import _partial_combine as pc

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    for T, n, Dd in ((9, 2, 80), (33, 4, 64), (0, 2, 16)):
        hit = torch.rand(T, n, generator=g) < 0.6
        if T:
            hit[0] = False
        pos = torch.where(hit, torch.cumsum(hit, 0) - 1 + torch.arange(n) * T, -1)
        parts = torch.randn(n * T, Dd, generator=g)
        # bf16 on CUDA only: the interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest).
        for odt in (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,):
            got = pc.sum_over_ranks_at(parts.to(dev), pos.to(dev), odt).cpu()
            pc_use = pc.use_kernel
            try:
                pc.use_kernel = lambda *_: False  # type: ignore[assignment]  # the torch form
                ref = pc.sum_over_ranks_at(parts, pos, odt)
            finally:
                pc.use_kernel = pc_use  # type: ignore[assignment]
            assert torch.equal(got, ref), (T, n, odt)


@_ON_KERNEL
def test_interp_fixed_bounded_experts_are_bitwise_the_experts() -> None:
    """The experts with the count-bounded SwiGLU against GroupedExperts itself on the
    rows below the count (the rows past it NaN, as the worst-case buffers' may be):
    forward, input gradient of those rows and every weight gradient, bitwise (the same
    GEMM calls and SwiGLU arithmetic); and the bounded path was taken."""
    import spmd_moe.dispatch.fixed_exchange as fx
    from spmd_moe.dispatch import _partial_combine as pc
    from spmd_moe.experts import GroupedExperts

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cpu" and os.environ.get("SPMD_MOE_FUSED_BWD_INTERPRET") != "1":
        pytest.skip("needs the fused kernels' interpreter opt-in")
    from spmd_moe import ParallelContext

    cfg = make_cfg(param_dtype=dt)
    ex = GroupedExperts(cfg, ParallelContext.single(), device=torch.device(dev))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p_ in ex.parameters():
            p_.copy_(torch.randn(p_.shape, generator=g) * 0.3)
    counts = torch.tensor([3, 0, 5, 1, 0, 2, 4, 2], device=dev)  # 17 rows x F=24: the count ends mid-block
    R = int(counts.sum())
    M = R + 12
    x = torch.randn(M, D, generator=g).to(dev, dt)
    x[R:] = float("nan")
    gy = torch.randn(R, D, generator=g).to(dev, dt)
    calls = {"n": 0}
    orig = pc.swiglu_bounded

    def spy(*a: Any) -> torch.Tensor:
        calls["n"] += 1
        return orig(*a)

    pc.swiglu_bounded = spy  # type: ignore[assignment]
    block, programs = pc._SWIGLU_BLOCK, pc._SWIGLU_PROGRAMS
    # Small blocks, 3 programs: each loops over several blocks, the count ends mid-block.
    pc._SWIGLU_BLOCK, pc._SWIGLU_PROGRAMS = 64, 3
    try:
        res = []
        for bounded in (True, False):
            for p_ in ex.parameters():
                p_.grad = None
            xi = x.clone().requires_grad_(True)
            y = fx._experts_bounded(ex, xi, counts, counts.sum().view(1)) if bounded else ex(xi, counts, True)
            (y[:R] * gy).sum().backward()
            with torch.no_grad():
                y_inf = fx._experts_bounded(ex, x, counts, counts.sum().view(1)) if bounded else ex(x, counts, True)
            res.append((y[:R].detach(), y_inf[:R], xi.grad[:R], [p_.grad.clone() for p_ in ex.parameters()]))
    finally:
        pc.swiglu_bounded = orig  # type: ignore[assignment]
        pc._SWIGLU_BLOCK, pc._SWIGLU_PROGRAMS = block, programs
    assert calls["n"] == 2, "the bounded SwiGLU was not taken"
    (a, ai, ag, aw), (b, bi, bg, bw) = res
    assert torch.equal(a, b) and torch.equal(ai, bi) and torch.equal(ag, bg)
    assert all(torch.equal(u, v) for u, v in zip(aw, bw))


@_ON_KERNEL
def test_interp_fixed_slot_plan_kernels_match_torch() -> None:
    """The expert rank's slot plan (a counting sort in two kernels) against its torch form
    (a stable sort and binary searches), exactly (integers, copied fp32): ids as int64
    [N, K] and as the exchanged fp32 rows' strided view, pads and sentinel ids (no
    expert here), one expert taking every slot, N=0 and several blocks of slots."""
    from types import SimpleNamespace

    from spmd_moe.dispatch import _partial_combine as pc
    from spmd_moe.dispatch.fixed_exchange import _fixed_slots

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(8)
    for N, n, e, Kk, meta in ((0, 2, 4, 2, False), (1, 2, 4, 2, True), (37, 2, 4, 3, False), (300, 4, 2, 4, True),
                              (700, 2, 64, 8, True), (130, 2, 8, 2, False)):
        E = n * e
        ids = torch.stack([torch.randperm(E, generator=g)[:Kk] for _ in range(N)]) if N else torch.zeros(0, Kk, dtype=torch.int64)
        if N > 3:
            ids[N // 3] = E  # a pad / sentinel row: no expert anywhere
            ids[N // 2] = torch.arange(Kk) % E  # rank 0's first experts
        if N == 130:
            ids[:, 0] = 1  # one expert takes a slot of every token
        w = torch.rand(N, Kk, generator=g)
        start = e * (1 if n > 1 else 0)
        fake = SimpleNamespace(start=start, num_local=e)
        if meta:
            m = torch.cat([ids.float(), w], dim=1).to(dev)
            ids_in, w_in = m[:, :Kk], m[:, Kk:]
        else:
            ids_in, w_in = ids.to(dev), w.to(dev)
        got = _fixed_slots(fake, ids_in, w_in)  # type: ignore[arg-type]
        assert pc.slot_plan(ids_in, w_in, start, e) is not None
        orig = pc.slot_plan
        try:
            pc.slot_plan = lambda *_: None  # type: ignore[assignment]  # the torch form
            ref = _fixed_slots(fake, ids, w)  # type: ignore[arg-type]
        finally:
            pc.slot_plan = orig  # type: ignore[assignment]
        R = int(ref[4])
        where = (N, n, e, Kk, meta)
        assert int(got[4]) == R and torch.equal(got[1].cpu(), ref[1]), where
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[2].cpu(), ref[2]), where
        assert got[3].shape == ref[3].shape and torch.equal(got[3][:R].cpu(), ref[3][:R]), where


def test_interp_fixed_plan_kernel_matches_torch() -> None:
    """The send plan in one kernel against its torch form, exactly (integers): tokens
    going to every rank, to some, pads (id E: nowhere), several blocks of tokens (the
    running scan's carry), T=1."""
    from types import SimpleNamespace

    from spmd_moe.dispatch import _partial_combine as pc
    from spmd_moe.dispatch.fixed_exchange import fixed_plan

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    for T, n, e, Kk in ((1, 2, 4, 2), (37, 2, 4, 3), (600, 4, 2, 4), (300, 2, 64, 8)):
        E = n * e
        ids = torch.stack([torch.randperm(E, generator=g)[:Kk] for _ in range(T)]).sort(-1).values
        ids[T // 3] = E  # a pad token
        fake = SimpleNamespace(pctx=SimpleNamespace(size=n), num_local=e)
        got = fixed_plan(fake, ids.to(dev))  # type: ignore[arg-type]
        orig = pc.use_kernel
        try:
            pc.use_kernel = lambda *_: False  # type: ignore[assignment]  # the torch form
            ref = fixed_plan(fake, ids)  # type: ignore[arg-type]
        finally:
            pc.use_kernel = orig  # type: ignore[assignment]
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1]), (T, n, e, Kk)


def _fixed_kernels_end_to_end(rank: int, n: int) -> list[str]:
    import spmd_moe.dispatch.all_to_all as a2a
    from spmd_moe.dispatch import _partial_combine as pc

    a2a.PARTIAL_ON_CPU = True
    bad = []
    try:
        for layout, T, skew in (("sequence", 7, "none"), ("sequence", 24, "one_rank"), ("replicated", 13, "one_expert")):
            cfg = make_cfg(dispatcher="all_to_all", padding="pad", top_k=4, load_balance_coeff=1e-3 if skew != "none" else None)
            full, moe = build_pair(cfg, world_pctx(), layout, 80 + T, skew=skew)
            moe.prefill_dispatcher.equal_tokens = True
            x_all = torch.randn(n * T if layout == "sequence" else T, D, generator=torch.Generator().manual_seed(T))
            sl = slice(rank * T, (rank + 1) * T) if layout == "sequence" else slice(0, T)
            with torch.no_grad():
                assert pc.use_kernel(x_all)
                moe(x_all[sl])
                y, reads, sent, taken = _run(moe, x_all[sl])
                err = rel_err(y, full(x_all)[sl])
            if err > FWD_TOL or reads or taken != 1 or len(sent) != 3:
                bad.append(f"{layout} T={T} {skew}: rel err {err:.3g}, {reads} reads, taken {taken}, {len(sent)} exchanges")
            # Training: the backward kernels (scaled gather, gate-value gradients, the
            # unit-weight sums) against the single-device layer's gradients.
            gy = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(T + 1))
            xr = x_all.clone().requires_grad_(True)
            (full(xr) * gy).sum().backward()
            xi = x_all[sl].clone().requires_grad_(True)
            with count_host_reads() as reads_fb:
                ((moe(xi) * gy[sl]).sum() / (n if layout == "replicated" else 1)).backward()
            gx = xi.grad.clone() if xi.grad is not None else torch.zeros_like(xi)
            gate = moe.router.gate.weight.grad.clone()
            import torch.distributed as dist
            if layout == "replicated":
                dist.all_reduce(gx)
            dist.all_reduce(gate)
            errs = {"grad_x": rel_err(gx, xr.grad[sl]), "grad_gate": rel_err(gate, full.router.gate.weight.grad)}
            if any(v > GRAD_TOL for v in errs.values()) or sum(reads_fb.values()):
                bad.append(f"{layout} T={T} {skew} training: {errs}, {sum(reads_fb.values())} host reads")
    finally:
        a2a.PARTIAL_ON_CPU = False
    return bad


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess above")
def test_interp_fixed_kernels_end_to_end() -> None:
    res = run_distributed(_fixed_kernels_end_to_end, 2, timeout=500, pg_timeout=300)
    bad = [f"rank {r}: {b}" for r, bs in enumerate(res) for b in bs]
    assert not bad, "\n".join(bad)


def _debug_promise(rank: int, n: int) -> dict[str, Any]:
    """Debug mode with equal_tokens set: equal T runs (the row path), unequal T raises on
    every rank."""
    import spmd_moe
    from spmd_moe.errors import DistributedError

    _, moe = build_pair(make_cfg(dispatcher="all_to_all", top_k=2), world_pctx(), "sequence", 4)
    moe.prefill_dispatcher.equal_tokens = True
    out: dict[str, Any] = {}
    with torch.no_grad(), spmd_moe.debug():
        moe(torch.randn(6, D))
        out["equal_ok"] = True
        try:
            moe(torch.randn(5 + 2 * rank, D))
            out["unequal"] = None
        except DistributedError as e:
            out["unequal"] = str(e)
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 4])
def test_debug_mode_catches_unequal_tokens(n: int) -> None:
    """The promise behind equal_tokens, checked in debug mode on every call: ranks with
    different T raise DistributedError on every rank (naming the counts and the fix), in
    bounded time, instead of the fixed-size exchange hanging with debug off."""
    res = run_distributed(_debug_promise, n, timeout=150, pg_timeout=30)
    counts = [5 + 2 * r for r in range(n)]
    for rank, r in enumerate(res):
        assert r["equal_ok"]
        msg = r["unequal"]
        assert msg is not None, f"rank {rank}: no error"
        assert f"T={5 + 2 * rank}" in msg and str(counts) in msg and "Fix:" in msg, msg


GRAD_TOL = 1e-5  # the grid's gradient tolerance: sums over tokens and ranks in other orders (fp32)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n", [2, 4])
def test_fixed_size_training_matches_single_device(n: int) -> None:
    """Forward 1e-6 and every gradient 1e-5 relative against the single-device layer (fp32:
    the same products; sums over k, ranks and tokens in other orders), no host read in
    forward + backward, and six exchanges (three each way), each of exactly n*T rows."""
    bad = []
    for rank, r in enumerate(_results(n)):
        for c in r["train"]:
            where = f"world {n} rank {rank} {c['layout']} T={c['T']} skew={c['skew']} top_k={c['top_k']}"
            for k, v in c["errs"].items():
                if v > (FWD_TOL if k == "fwd" else GRAD_TOL):
                    bad.append(f"{where}: {k} rel err {v:.3g}")
            if c["reads"]:
                bad.append(f"{where}: {c['reads']} host reads in forward + backward")
            N = c["sent"][0][0][0] if c["sent"] else -1
            if len(c["sent"]) != 6 or any(s[0][0] != N or s[1][0] != N for s in c["sent"]):
                bad.append(f"{where}: exchanges (in shape, out shape) {c['sent']}")
    assert not bad, "\n".join(bad[:20])
