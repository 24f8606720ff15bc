"""The communicator seam (spmd_moe.comm): every backend moves the same bytes.

Backends: TorchComm (torch.distributed on the group; the default), MeshComm (a torch
DeviceMesh dim through functional collectives) and, with vLLM installed, VllmComm
(vLLM's GroupCoordinator, its distributed state initialised on the gloo group with
init_distributed_environment + initialize_model_parallel, shared-memory communicator
on). On real gloo groups of 2 and 4 ranks, the typed collectives and whole MoE layers
(replicated decode = the one-all-reduce path, replicated prefill = all_to_all,
sequence layout, and an autograd forward+backward) give bitwise the same results
through every backend (digests over the bytes). Bitwise is a guarantee here: the
inputs of each sum are exact zeros but one (the MoE's slot sums) or two-term sums
(commutative) at n = 2; at n = 4 the raw all_reduce / reduce_scatter inputs are small
integers (exact in fp32 and bf16 in any order).

Also here: the replicated all-reduce path equals the split (all_gather dispatcher)
path bit for bit, incl. counters and recorded routes; one decode step of a layer makes
exactly one collective (the backend's all_reduce) and no torch.distributed call; and
the decode path has no host sync (an audit under a TorchFunctionMode that flags
.item(), .tolist(), bool()/int() of a tensor, nonzero, boolean-mask indexing, ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from dist_utils import run_distributed
from spmd_moe import MoE, MoEConfig, ParallelContext
from spmd_moe import collectives as C
from spmd_moe.comm import Comm, MeshComm, TorchComm
from spmd_moe.placement import EP, as_par, as_var

D, F_HID, E, K, S_HID = 16, 24, 8, 2, 16
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _cfg(**kw: Any) -> MoEConfig:
    base: dict[str, Any] = dict(dim=D, hidden_dim=F_HID, num_experts=E, top_k=K, padding="pad", load_balance_coeff=1e-3)
    base.update(kw)
    return MoEConfig(**base)


def _digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _layer(cfg: MoEConfig, pctx: ParallelContext[EP], layout: str = "replicated", seed: int = 3) -> MoE[Any]:
    m = MoE(cfg, pctx, layout=layout)
    m.init_states(seed)  # the same experts whatever the EP layout
    return m


def _x(T: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _vllm_context(world: int, rank: int) -> ParallelContext[EP]:
    """vLLM's distributed state on the existing gloo world, and the TP context on it."""
    os.environ.setdefault("VLLM_DIST_IDENT", f"spmd-comm-test-{os.environ.get('MASTER_PORT', '0')}")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # vllm._C: the shared-memory communicator's ops
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world, rank, "env://", rank, backend="gloo")
        ps.initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
    from spmd_moe.integrations.vllm.comm import vllm_tp_context

    return vllm_tp_context()


def _contexts(world: int, rank: int, with_vllm: bool) -> dict[str, ParallelContext[EP]]:
    from torch.distributed.device_mesh import init_device_mesh

    out = {"torch": ParallelContext.from_group(dist.group.WORLD, "tp")}
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    out["mesh"] = ParallelContext.from_mesh(mesh, "tp")
    if with_vllm:
        out["vllm"] = _vllm_context(world, rank)
    return out


def _collective_digests(pctx: ParallelContext[EP]) -> dict[str, str]:
    n, r = pctx.size, pctx.rank
    g = torch.Generator().manual_seed(100 + r)
    out: dict[str, str] = {}
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            # Small integers: every sum exact in any order (n = 4 included).
            x = torch.randint(-8, 8, (2 * n, 5), generator=g).to(dt)
            out[f"all_gather_{dt}"] = _digest(C.all_gather(as_var(x, pctx, "x"), pctx))
            out[f"reduce_scatter_{dt}"] = _digest(C.reduce_scatter(as_par(x, pctx, "x"), pctx))
            x0 = x.clone()
            out[f"all_reduce_{dt}"] = _digest(C.all_reduce(as_par(x, pctx, "x"), pctx))
            out[f"all_reduce_input_untouched_{dt}"] = str(torch.equal(x, x0))  # not donated: a copy is reduced
            out[f"all_reduce_donated_{dt}"] = _digest(C.all_reduce(as_par(x.clone(), pctx, "x"), pctx, donate=True))
            splits = [(r + j) % 3 for j in range(n)]  # uneven, 0 included
            recv = [(j + r) % 3 for j in range(n)]  # what rank j sends to r: (j + r) % 3
            rows = torch.randn(sum(splits), 3, generator=g).to(dt)
            out[f"all_to_all_{dt}"] = _digest(C.all_to_all(as_var(rows, pctx, "rows"), pctx, splits, recv))
        # Integers (expert ids, counts): vLLM's CPU shared-memory kernels have none.
        for it in (torch.int64, torch.int32):
            ids = torch.randint(-5, 50, (3, 2), generator=g).to(it)
            out[f"all_gather_{it}"] = _digest(C.all_gather(as_var(ids, pctx, "ids"), pctx))
            out[f"all_reduce_{it}"] = _digest(C.all_reduce(as_par(ids, pctx, "ids"), pctx))
            out[f"reduce_scatter_{it}"] = _digest(C.reduce_scatter(as_par(ids.repeat(n, 1), pctx, "ids"), pctx))
    return out


def _moe_digests(pctx: ParallelContext[EP]) -> dict[str, str]:
    n, r = pctx.size, pctx.rank
    out: dict[str, str] = {}
    for shared in (False, True):
        cfg = _cfg(shared_hidden_dim=S_HID if shared else None, score_func="sigmoid" if shared else "softmax")
        rep = _layer(cfg, pctx)
        gathered = _layer(_cfg(dispatcher="all_gather", shared_hidden_dim=cfg.shared_hidden_dim), pctx)
        with torch.inference_mode():  # the all_gather dispatcher: ids (int64) gathered too
            out[f"all_gather_dispatcher_sh{shared}"] = _digest(gathered(_x(7, 2)))
        seq = _layer(cfg, pctx, "sequence")
        with torch.inference_mode():
            for T in (1, 3, 8, 16, 33, 70):  # decode (all-reduce path) and prefill (all_to_all)
                out[f"rep_T{T}_sh{shared}"] = _digest(rep(_x(T, T)))
            for T in (5, 40):
                xs = _x(T * n, T).chunk(n)[r]
                out[f"seq_T{T}_sh{shared}"] = _digest(seq(xs))
            out[f"counts_sh{shared}"] = _digest(rep.global_tokens_per_expert())
        # Autograd: spmd_types' collectives on the group, all_to_all through the backend.
        x = _x(40, 9).requires_grad_(True)
        y = rep(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # type: ignore[no-untyped-call]
        assert x.grad is not None
        out[f"grad_sh{shared}"] = _digest(y, x.grad, *(p.grad for p in rep.parameters() if p.grad is not None))
    return out


def backends_worker(rank: int, world: int, with_vllm: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    ctxs = _contexts(world, rank, with_vllm)
    res: dict[str, Any] = {"comms": {k: repr(p.comm) for k, p in ctxs.items()}}
    for name, pctx in ctxs.items():
        res[name] = {**_collective_digests(pctx), **_moe_digests(pctx)}
    return res


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_torch_and_mesh_backends_bitwise(world: int) -> None:
    results = run_distributed(backends_worker, world, False, timeout=240)
    for rank, res in enumerate(results):
        assert res["comms"]["torch"].startswith("TorchComm(gloo"), res["comms"]
        assert res["comms"]["mesh"].startswith("MeshComm("), res["comms"]
        assert res["mesh"].keys() == res["torch"].keys()
        diff = [k for k in res["torch"] if res["mesh"][k] != res["torch"][k]]
        assert not diff, f"rank {rank}: MeshComm differs from TorchComm on {diff}"
    # Replicated outputs: the same bits on every rank.
    for k in results[0]["torch"]:
        if k.startswith("rep_") or k.startswith("counts") or k.startswith("all_gather") or k.startswith("all_reduce"):
            assert len({res["torch"][k] for res in results}) == 1, k


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed")
@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", [2])
def test_vllm_backend_bitwise(world: int) -> None:
    """VllmComm (vLLM's shared-memory communicator) against TorchComm and MeshComm."""
    results = run_distributed(backends_worker, world, True, timeout=400, pg_timeout=120)
    for rank, res in enumerate(results):
        assert "VllmComm(tp" in res["comms"]["vllm"] and "_CPUSHMDistributed" in res["comms"]["vllm"], res["comms"]
        for other in ("torch", "mesh"):
            diff = [k for k in res[other] if res["vllm"][k] != res[other][k]]
            assert not diff, f"rank {rank}: VllmComm differs from {other} on {diff}"


# ---------------------------------------------------------------- the one-all-reduce path
def paths_worker(rank: int, world: int) -> list[str]:
    """The replicated all-reduce path (dispatcher 'auto', inference) against the split
    path (dispatcher 'all_gather': AllGatherDispatcher), bitwise; problems as strings."""
    from spmd_moe import replicated_decode as rd

    pctx = ParallelContext.from_group(dist.group.WORLD, "tp")
    bad: list[str] = []
    for dt in (torch.float32, torch.bfloat16):
        for shared in (False, True):
            kw: dict[str, Any] = dict(shared_hidden_dim=S_HID if shared else None, param_dtype=dt,
                                      score_func="sigmoid" if shared else "softmax", route_norm=shared)
            fast = _layer(_cfg(**kw), pctx)
            ref = _layer(_cfg(dispatcher="all_gather", **kw), pctx)
            fast.record_routes = ref.record_routes = True
            for T in (1, 2, 3, 5, 7, 16, 16 * world - 1, 16 * world):  # up to decode_max_tokens per rank
                x = _x(T, 10 + T, dt)
                with torch.inference_mode():
                    if not rd.applies(fast, T):
                        bad.append(f"{dt} shared={shared} T={T}: the all-reduce path does not apply")
                    y_fast, y_ref = fast(x), ref(x)
                if not torch.equal(y_fast, y_ref):
                    err = float((y_fast.double() - y_ref.double()).abs().max())
                    bad.append(f"{dt} shared={shared} T={T}: outputs differ (max |d| {err:.3g})")
            with torch.inference_mode():
                if not torch.equal(fast.global_tokens_per_expert(), ref.global_tokens_per_expert()):
                    bad.append(f"{dt} shared={shared}: counters differ")
            if len(fast.recorded_routes) != len(ref.recorded_routes) or not all(
                torch.equal(a, b) for a, b in zip(fast.recorded_routes, ref.recorded_routes)
            ):
                bad.append(f"{dt} shared={shared}: recorded routes differ")
    # Past decode_max_tokens (a communicator's replicated_max_tokens hint): equal to the
    # all_to_all (prefill) path.
    hinted = CountingComm(pctx.backend)
    hinted.replicated_max_tokens = 1 << 30
    for shared in (False, True):
        kw = dict(shared_hidden_dim=S_HID if shared else None)
        fast = _layer(_cfg(**kw), pctx.with_comm(hinted))
        ref = _layer(_cfg(dispatcher="all_to_all", **kw), pctx)
        for T in (16 * world + 1, 70, 257):
            x = _x(T, T)
            with torch.inference_mode():
                if not rd.applies(fast, T):
                    bad.append(f"T={T}: the hint is ignored")
                y_fast, y_ref = fast(x), ref(x)
            if not torch.equal(y_fast, y_ref):
                bad.append(f"shared={shared} T={T}: all-reduce path != all_to_all path")
        if hinted.calls.get("all_to_all"):
            bad.append(f"the hinted layer ran all_to_all: {hinted.calls}")
    # A capturable communicator (CUDA) past decode_max_tokens: no host sync, and the
    # all-gather dispatcher's computation at that size.
    capt = CountingComm(pctx.backend)
    capt.replicated_max_tokens, capt.capturable = 1 << 30, True
    fast = _layer(_cfg(shared_hidden_dim=S_HID), pctx.with_comm(capt))
    ref = _layer(_cfg(shared_hidden_dim=S_HID, dispatcher="all_gather", decode_max_tokens=1 << 20), pctx)
    with torch.inference_mode():
        for T in (16 * world + 1, 70):
            fast(_x(T, 0))  # the metadata header: once per (layer, T)
            x = _x(T, T)
            with SyncAudit() as audit:
                y_fast = fast(x)
            if audit.hits:
                bad.append(f"capturable T={T}: host sync {audit.hits}")
            if not torch.equal(y_fast, ref(x)):
                bad.append(f"capturable T={T}: != all_gather dispatcher at that size")
    # Not taken with autograd on (the split path's gradients) or past decode_max_tokens.
    m = _layer(_cfg(), pctx)
    if rd.applies(m, 4):
        bad.append("applies with autograd on")
    with torch.no_grad():
        if rd.applies(m, 16 * world + 1):
            bad.append(f"applies past decode_max_tokens (T={16 * world + 1})")
        if not rd.applies(m, 4):
            bad.append("does not apply under torch.no_grad")
    return bad


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_path_equals_split_path_bitwise(world: int) -> None:
    results = run_distributed(paths_worker, world, timeout=240)
    problems = [f"rank {r}: {p}" for r, res in enumerate(results) for p in res]
    assert not problems, "\n".join(problems)


class CountingComm:
    """A Comm that counts its calls and forwards them to another."""

    def __init__(self, inner: Comm) -> None:
        self.inner = inner
        self.name = "counting"
        self.capturable = inner.capturable
        self.calls: dict[str, int] = {}
        self.replicated_max_tokens: int | None = getattr(inner, "replicated_max_tokens", None)

    def _n(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self._n("all_gather")
        return self.inner.all_gather(x)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        self._n("reduce_scatter")
        return self.inner.reduce_scatter(x)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._n("all_reduce")
        return self.inner.all_reduce(x)

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        self._n("all_to_all")
        return self.inner.all_to_all(x, in_splits, out_splits)


@contextmanager
def _count_torch_distributed() -> Iterator[dict[str, int]]:
    """Count calls of torch.distributed's collectives (the group path, metadata checks)."""
    names = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single",
             "all_gather", "broadcast", "barrier", "all_gather_object")
    counts: dict[str, int] = {}
    saved = {k: getattr(dist, k) for k in names}

    def wrap(k: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def g(*a: Any, **kw: Any) -> Any:
            counts[k] = counts.get(k, 0) + 1
            return f(*a, **kw)
        return g

    for k, f in saved.items():
        setattr(dist, k, wrap(k, f))
    try:
        yield counts
    finally:
        for k, f in saved.items():
            setattr(dist, k, f)


# What a decode step must never call: each one reads a device value back to the host
# (or, for boolean-mask indexing, sizes its output from the data).
_SYNC_OPS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
    "unique_consecutive", "bincount", "masked_select", "numpy", "cpu", "equal", "allclose", "any", "all",
})


class SyncAudit(TorchFunctionMode):
    """Records torch calls that would sync the host with the device."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _SYNC_OPS:
            self.hits.append(name)
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            self.hits.append("repeat_interleave without output_size")
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _has_bool_index(args[1:2]):
            self.hits.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


def _has_bool_index(idx: Any) -> bool:
    stack = list(idx)
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor) and v.dtype == torch.bool:
            return True
        if isinstance(v, (tuple, list)):
            stack.extend(v)
    return False


def decode_step_worker(rank: int, world: int) -> dict[str, Any]:
    base = ParallelContext.from_group(dist.group.WORLD, "tp")
    assert base.comm is not None
    counting = CountingComm(base.comm)
    pctx = base.with_comm(counting)
    res: dict[str, Any] = {}
    for shared in (False, True):
        m = _layer(_cfg(shared_hidden_dim=S_HID if shared else None), pctx)
        with torch.inference_mode():
            for T in (1, 2, 5):
                m(_x(T, 1))  # the metadata header: once per (layer, T)
            counting.calls.clear()
            with _count_torch_distributed() as raw, SyncAudit() as audit:
                for T in (1, 2, 5):  # decode steps, odd T padded
                    m(_x(T, T))
        res[f"shared={shared}"] = {"comm": dict(counting.calls), "torch.distributed": dict(raw), "sync": audit.hits}
        # The prefill path for contrast (it syncs for the split sizes, by design).
        with torch.inference_mode(), SyncAudit() as audit:
            m(_x(16 * world + 2, 4))
        res[f"prefill_shared={shared}"] = audit.hits
    return res


@pytest.mark.timeout(240)
def test_decode_step_one_all_reduce_no_host_sync() -> None:
    """Three decode steps of one layer: 3 backend all_reduces (shared experts folded in),
    nothing else, no other torch.distributed call on the group, no host-sync op. The audit
    itself is checked: the prefill path's split sizes (.tolist()) are caught."""
    results = run_distributed(decode_step_worker, 2, timeout=200)
    for rank, res in enumerate(results):
        for shared in (False, True):
            r = res[f"shared={shared}"]
            assert r["comm"] == {"all_reduce": 3}, (rank, shared, r)
            # TorchComm's own dist.all_reduce, and nothing else on the group.
            assert r["torch.distributed"] == {"all_reduce": 3}, (rank, shared, r)
            assert r["sync"] == [], (rank, shared, r)
            assert "tolist" in res[f"prefill_shared={shared}"], res
