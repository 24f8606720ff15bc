"""Run a function on a real multi-process gloo group, bounded in time.

Each rank runs ``fn(rank, world_size, *args)`` in a spawned process; the return value
(picklable) of each rank comes back in rank order. A rank that raises makes the call
raise with that rank's traceback; a run that exceeds ``timeout`` is killed and raises.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, outdir: str, pg_timeout: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    result: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc(), "type": type(e).__name__}
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        if result["ok"] and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0, pg_timeout: float = 30.0) -> list[dict[str, Any]]:
    """Return each rank's {'ok', 'value'|'error','tb','type'} without raising."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_worker, args=(r, world, port, outdir, pg_timeout, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append({"ok": False, "error": f"rank {r} produced no result (hung={r in hung})", "tb": "", "type": "Hang"})
        return results


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0, pg_timeout: float = 30.0) -> list[Any]:
    """Run and return each rank's value; raise AssertionError naming the failing ranks."""
    results = run_ranks(fn, world, *args, timeout=timeout, pg_timeout=pg_timeout)
    bad = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if bad:
        msg = "\n".join(f"--- rank {r}: {res['error']}\n{res['tb']}" for r, res in bad)
        raise AssertionError(f"distributed run failed on ranks {[r for r, _ in bad]}:\n{msg}")
    return [res["value"] for res in results]


def nccl_world_problems(target: Callable[..., Any], world: int, timeout: float = 240.0) -> list[str]:
    """Spawn ``world`` ranks of ``target(rank, world, port, queue)`` (each sets up its NCCL
    group on cuda:rank and puts (rank, [problems]) on the queue); every rank's problems,
    prefixed with the rank. A rank that puts nothing within ``timeout`` fails the call."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(30)
    return [f"rank {r}: {b}" for r, bs in sorted(results.items()) for b in bs]
