"""MoEConfig.ep_equal_tokens (issue 13): the caller's promise that every rank passes the
same number of tokens in the 'sequence' layout. Real gloo groups of 2 and 4 ranks.

* kept (debug off): after the first call (which checks the config on every rank) the
  layer exchanges no per-rank counts and the all-to-all dispatcher takes the fixed-size
  exchange: no host read in the forward (every .tolist/.item/... counted), the output
  within 1e-6 relative of the single-device layer (fp32: the same products, the sum over
  k split per rank and added in rank order) and its counters exact;
* without the promise, the same layer reads the per-rank counts on the host every call
  (the control: the counter above can see a read);
* broken (debug mode): ranks with different T raise DistributedError on every rank, naming
  the counts and the fix, in bounded time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dist_utils import run_distributed
from test_ep_overlap import count_host_reads
from tp2ep_util import D, build_pair, make_cfg, rel_err, world_pctx


def _kept(rank: int, n: int) -> dict[str, Any]:
    from spmd_moe.dispatch import all_to_all as a2a

    a2a.PARTIAL_ON_CPU = True  # the CUDA inference path, on the CPU
    out: dict[str, Any] = {}
    try:
        for promise in (True, False):
            full, moe = build_pair(make_cfg(ep_equal_tokens=promise, kernels="fast"), world_pctx(), "sequence", 7)
            g = torch.Generator().manual_seed(11)
            x_all = torch.randn(n * 24, D, generator=g)
            x = x_all[rank * 24 : (rank + 1) * 24]
            with torch.no_grad():
                moe(x)  # first call: the config check on every rank
                moe.tokens_per_expert_E.zero_()
                full.tokens_per_expert_E.zero_()
                with count_host_reads() as reads:
                    y = moe(x)
                ref = full(x_all)[rank * 24 : (rank + 1) * 24]
            counts = moe.tokens_per_expert_E.clone()
            torch.distributed.all_reduce(counts)
            out[promise] = {"reads": sum(reads.values()), "rel": rel_err(y, ref),
                            "counts_ok": bool(torch.equal(counts, full.tokens_per_expert_E)),
                            "equal_tokens": moe.prefill_dispatcher.equal_tokens}
    finally:
        a2a.PARTIAL_ON_CPU = False
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 4])
def test_equal_tokens_promise_removes_the_host_reads(n: int) -> None:
    for rank, r in enumerate(run_distributed(_kept, n, timeout=200, pg_timeout=30)):
        kept, control = r[True], r[False]
        assert kept["equal_tokens"] and not control["equal_tokens"], r
        assert kept["reads"] == 0, f"rank {rank}: {kept['reads']} host reads with ep_equal_tokens"
        assert control["reads"] >= 1, f"rank {rank}: the control read nothing: the counter cannot see reads"
        for what, c in (("promise", kept), ("control", control)):
            assert c["rel"] <= 1e-6, f"rank {rank} {what}: rel {c['rel']:.3g} vs the single-device layer"
            assert c["counts_ok"], f"rank {rank} {what}: load-balance counters differ"


def _broken(rank: int, n: int) -> str | None:
    import spmd_moe
    from spmd_moe.errors import DistributedError

    _, moe = build_pair(make_cfg(ep_equal_tokens=True), world_pctx(), "sequence", 3)
    with torch.no_grad(), spmd_moe.debug():
        moe(torch.randn(8, D))  # equal: fine
        try:
            moe(torch.randn(5 + 2 * rank, D))
        except DistributedError as e:
            return str(e)
    return None


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n", [2, 4])
def test_debug_mode_catches_a_broken_promise(n: int) -> None:
    counts = [5 + 2 * r for r in range(n)]
    for rank, msg in enumerate(run_distributed(_broken, n, timeout=150, pg_timeout=30)):
        assert msg is not None, f"rank {rank}: no error for unequal counts {counts}"
        assert "ep_equal_tokens" in msg and str(counts) in msg and "Fix:" in msg, msg
