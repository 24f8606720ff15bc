"""What the placement annotations cost: debug off vs erased, and debug on.

    python -m spmd_moe.apps.bench.overhead [--json] [--iters 200] [--tokens 512] [--ranks 2]

Three variants of the same MoE layer (same weights, same input), timed interleaved
(one call of each per round, order rotated), forward under torch.no_grad on CPU:

* ``erased``: every ``@checked`` method replaced by the undecorated function
  (``__wrapped__``), the ``as_*`` placement statements by the identity and the
  layer's tracked-region hook by a no-op: the layer as if it had no annotations;
* ``debug_off``: the layer as shipped, debug mode off;
* ``debug_on``: debug mode on (jaxtyping + beartype shape/dtype checks; on one
  device there is no placement tracking, so this is the shape/dtype part of it).

Overhead = median time / median erased time - 1 (thread CPU time, so the other
processes on a shared machine count less). The erased layer is timed twice: the
difference of the two is the noise floor. Because the off-overhead is far below that
floor, it is also estimated directly: (calls to annotation code per forward) x
(measured cost of one such call).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _wrapper_code() -> Any:
    from spmd_moe.checking import checked

    def probe() -> None: ...

    return checked(probe).__code__  # every @checked wrapper shares this code object


def _identity(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return t


def _modules() -> list[str]:
    """Every loaded spmd_moe module (the layer, its token layout, dispatchers, ...)."""
    import spmd_moe  # noqa: F401 - loads the layer's modules

    return sorted(m for m in sys.modules if m.startswith("spmd_moe.") and sys.modules[m] is not None)


@contextlib.contextmanager
def erased() -> Iterator[int]:
    """Patch the annotation machinery out of the layer; yields how many sites it patched."""
    from spmd_moe.moe import MoE

    code = _wrapper_code()
    undo: list[tuple[object, str, object]] = []

    def patch(owner: object, name: str, new: object) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    null = contextlib.nullcontext()
    for modname in _modules():
        mod = importlib.import_module(modname)
        for name, obj in list(vars(mod).items()):
            if name in ("as_rep", "as_var", "as_par", "as_inv"):
                patch(mod, name, _identity)
            elif isinstance(obj, type) and obj.__module__ == modname:
                for attr, fn in list(vars(obj).items()):
                    if getattr(fn, "__code__", None) is code:
                        patch(obj, attr, fn.__wrapped__)
    patch(MoE, "_typecheck", lambda self: null)
    try:
        yield len(undo)
    finally:
        for owner, name, old in reversed(undo):
            setattr(owner, name, old)


def _build(tokens: int, dim: int, hidden: int, experts: int, top_k: int) -> tuple[Any, torch.Tensor]:
    import spmd_moe as sm

    cfg = sm.MoEConfig(dim=dim, hidden_dim=hidden, num_experts=experts, top_k=top_k)
    moe = sm.MoE(cfg)
    moe.init_states(seed=0)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(0))
    return moe, x


def _timed(fn: Callable[[], object]) -> float:
    # CPU time of this thread: torch runs the layer in the calling thread (threads=1),
    # and other processes on the machine do not inflate it as they do wall time.
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def _per_call_cost(iters: int = 20000) -> dict[str, float]:
    """ns per call of a @checked no-op (debug off) and of as_var, minus a bare call."""
    from spmd_moe.checking import checked
    from spmd_moe.parallel import ParallelContext
    from spmd_moe.placement import as_var

    x = torch.zeros(1)
    pctx = ParallelContext.single()

    def bare(t: torch.Tensor, p: Any) -> torch.Tensor:
        return t

    wrapped = checked(bare)
    out: dict[str, list[float]] = {"bare": [], "checked_off": [], "as_var_off": []}
    fns: tuple[tuple[str, Callable[[torch.Tensor, Any], object]], ...] = (
        ("bare", bare), ("checked_off", wrapped), ("as_var_off", as_var))
    for _ in range(5):
        for key, f in fns:
            t0 = time.perf_counter_ns()
            for _ in range(iters):
                f(x, pctx)
            out[key].append((time.perf_counter_ns() - t0) / iters)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"checked_ns": med["checked_off"] - med["bare"], "as_var_ns": med["as_var_off"] - med["bare"]}


def measure(tokens: int = 512, dim: int = 256, hidden: int = 128, experts: int = 8, top_k: int = 2,
            iters: int = 200, warmup: int = 10, threads: int = 1) -> dict[str, Any]:
    import spmd_moe as sm
    from spmd_moe.checking import checked_calls

    torch.set_num_threads(threads)
    moe, x = _build(tokens, dim, hidden, experts, top_k)
    variants: dict[str, Callable[[], float]] = {}

    def off() -> float:
        with sm.debug(False):
            return _timed(lambda: moe(x))

    def on() -> float:
        with sm.debug(True):
            return _timed(lambda: moe(x))

    def bare() -> float:
        with sm.debug(False), erased():
            return _timed(lambda: moe(x))  # patching itself is outside the timed call

    # "erased_again" is the erased layer once more: its difference to "erased" is the
    # noise floor of this measurement (an A/A comparison).
    variants = {"erased": bare, "erased_again": bare, "debug_off": off, "debug_on": on}
    with torch.no_grad():
        ref = moe(x)
        with erased() as patched:
            same = torch.equal(moe(x), ref)
        with sm.debug(True), checked_calls() as calls:
            moe(x)
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for i in range(warmup + iters):
            for k in names[i % len(names):] + names[: i % len(names)]:  # rotate the order
                t = variants[k]()
                if i >= warmup:
                    times[k].append(t)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["erased"]

    def rel(k: str) -> float:
        return med[k] / base - 1.0

    cost = _per_call_cost()
    n_checked = sum(calls.values())
    # as_* statements per forward: counted by the number of as_* sites run, bounded
    # by a generous 4 per checked call (the layer has fewer).
    est_ns = n_checked * cost["checked_ns"] + 4 * n_checked * cost["as_var_ns"]
    return {
        "shape": {"T": tokens, "D": dim, "F": hidden, "E": experts, "top_k": top_k, "dtype": "float32",
                  "threads": threads, "device": "cpu", "ep": 1},
        "iters": iters,
        "patched_sites": patched,
        "erased_output_identical": same,
        "median_ms": {k: round(v * 1e3, 4) for k, v in med.items()},
        "timer": "thread CPU time (time.thread_time), medians",
        "debug_off_overhead_pct": round(100 * rel("debug_off"), 3),
        "noise_floor_pct": round(100 * rel("erased_again"), 3),
        "debug_on_overhead_pct": round(100 * rel("debug_on"), 2),
        "checked_calls_per_forward": n_checked,
        "per_call_ns": {k: round(v, 1) for k, v in cost.items()},
        "debug_off_overhead_estimate_pct": round(100 * est_ns * 1e-9 / base, 4),
        "target_debug_off_pct": 1.0,
        "target_met": 100 * max(rel("debug_off"), est_ns * 1e-9 / base) <= 1.0,
    }


def _rank_worker(rank: int, world: int, port: int, q: Any, tokens: int, iters: int, warmup: int) -> None:
    """One rank of measure_ranks (top level: spawn pickles it by name)."""
    import datetime
    import os

    import torch.distributed as dist

    import spmd_moe as sm

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        cfg = sm.MoEConfig(dim=256, hidden_dim=128, num_experts=8, top_k=2)
        moe = sm.MoE(cfg, sm.ParallelContext.from_group(dist.group.WORLD, "ep"))
        moe.init_states(seed=0)
        x: Any = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"erased": [], "erased_again": [], "debug_off": [], "debug_on": []}
        names = list(times)
        with torch.no_grad():
            for i in range(warmup + iters):
                for k in names[i % 4:] + names[: i % 4]:
                    bare = k.startswith("erased")
                    with sm.debug(k == "debug_on"), (erased() if bare else contextlib.nullcontext()):
                        dist.barrier()
                        t0 = time.perf_counter()
                        moe(x)
                        dist.barrier()  # the slowest rank's time
                        t = time.perf_counter() - t0
                    if i >= warmup:
                        times[k].append(t)
        if rank == 0:
            q.put({k: statistics.median(v) for k, v in times.items()})
    finally:
        dist.destroy_process_group()


def measure_ranks(world: int = 2, tokens: int = 512, iters: int = 60, warmup: int = 3,
                  timeout: float = 300.0) -> dict[str, Any]:
    """The same layer on ``world`` CPU ranks (gloo, layout 'replicated'): here debug mode
    also tracks placements through every op (spmd_types). Wall time with barriers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, world, port, q, tokens, iters, warmup)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        med: dict[str, float] = q.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return {
        "world": world, "iters": iters, "timer": "wall time between barriers, medians",
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "debug_off_overhead_pct": round(100 * (med["debug_off"] / med["erased"] - 1), 2),
        "noise_floor_pct": round(100 * (med["erased_again"] / med["erased"] - 1), 2),
        "debug_on_overhead_pct": round(100 * (med["debug_on"] / med["erased"] - 1), 1),
    }


def run(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Entry for ``spmd-moe bench`` (spmd_moe.apps.bench.run): the small CPU shape."""
    iters = int(getattr(args, "overhead_iters", None) or 200)
    tokens = int(getattr(args, "overhead_tokens", None) or 512)
    res = measure(tokens=tokens, iters=iters)
    if int(getattr(args, "overhead_ranks", None) or 0) > 1:
        res["ranks"] = measure_ranks(world=int(args.overhead_ranks), tokens=tokens,  # type: ignore[union-attr]
                                     iters=int(getattr(args, "overhead_rank_iters", None) or 60))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spmd_moe.apps.bench.overhead")
    p.add_argument("--json", action="store_true")
    p.add_argument("--iters", dest="overhead_iters", type=int, default=200)
    p.add_argument("--tokens", dest="overhead_tokens", type=int, default=512)
    p.add_argument("--ranks", dest="overhead_ranks", type=int, default=0,
                   help="also time the layer on this many gloo ranks (debug on tracks placements)")
    p.add_argument("--rank-iters", dest="overhead_rank_iters", type=int, default=60,
                   help="interleaved rounds for --ranks")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        m = res["median_ms"]
        print(f"MoE forward, CPU fp32, T={res['shape']['T']} D={res['shape']['D']} F={res['shape']['F']} "
              f"E={res['shape']['E']} top-{res['shape']['top_k']}, {res['iters']} interleaved rounds (medians):")
        print(f"  annotations erased : {m['erased']:.3f} ms")
        print(f"  debug off          : {m['debug_off']:.3f} ms  overhead {res['debug_off_overhead_pct']:+.3f}% "
              f"(estimate from per-call cost: {res['debug_off_overhead_estimate_pct']:.4f}%)")
        print(f"  debug on           : {m['debug_on']:.3f} ms  overhead {res['debug_on_overhead_pct']:+.2f}%")
        print(f"  noise floor (erased vs erased): {res['noise_floor_pct']:+.3f}%")
        if "ranks" in res:
            rk = res["ranks"]
            print(f"  on {rk['world']} gloo ranks (wall, {rk['iters']} rounds): erased {rk['median_ms']['erased']:.2f} ms, "
                  f"debug off {rk['debug_off_overhead_pct']:+.2f}% (noise floor {rk['noise_floor_pct']:+.2f}%), "
                  f"debug on (placement tracking) {rk['debug_on_overhead_pct']:+.1f}%")
        print(f"  target debug off <= 1%: {'met' if res['target_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
