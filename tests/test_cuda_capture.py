"""CUDA readiness of the inference decode path (issue 14 item 3); needs a GPU.

Run by scripts/gpu/capture.sh on the device machine (torch only: no vLLM there, so the
communicator is TorchComm on an NCCL group; VllmComm's CUDA collectives are vLLM's own
capturable ones and cannot be run here). Checked, in bf16 at decode sizes:

* world 1 (an NCCL group of one): the layer's replicated decode forward (torch kernels)
  and the one-all-reduce path's ops (spmd_moe.replicated_decode.forward, whose
  collectives are identities at n = 1) are recorded in a CUDA graph; replays on new
  inputs equal eager calls bit for bit; an eager decode step under
  torch.cuda.set_sync_debug_mode('error') makes no host sync; TorchComm's NCCL
  all_reduce is captured and replayed.
* world 2 (two GPUs, if present): the same for the all-reduce path with its real NCCL
  all-reduce (after the first call's one-off metadata check), plus equality with the
  split path (dispatcher='all_gather') with kernels='torchtitan'; with kernels='fast' (the
  decode kernels per rank, one fp32 all-reduce) capture, no sync and 3 bf16 ulps; and, with the communicator's
  replicated_max_tokens hint set as VllmComm sets it, at T = 100 and 256 too.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D, F_HID, E, K, S_HID = 256, 128, 16, 4, 128
DECODE_T = (1, 3, 8)


def _layer(pctx: Any, **kw: Any) -> Any:
    from spmd_moe import MoE, MoEConfig

    cfg = MoEConfig(dim=D, hidden_dim=F_HID, num_experts=E, top_k=K, shared_hidden_dim=S_HID, padding="pad",
                    param_dtype=torch.bfloat16, load_balance_coeff=1e-3, **kw)
    m = MoE(cfg, pctx, device="cuda")
    m.init_states(5)
    return m


def _x(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(torch.bfloat16).cuda()


def _capture(fn: Any, x_static: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    s = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(x_static)  # warm-up on a side stream (allocator, NCCL, kernels)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = fn(x_static)
    return graph, y_static


def _replays_match(fn: Any, T: int) -> list[str]:
    """Capture fn at [T, D], replay on new inputs, compare with eager; problems."""
    bad: list[str] = []
    x_static = _x(T, 0)
    graph, y_static = _capture(fn, x_static)
    for seed in (1, 2, 3):
        x = _x(T, seed)
        x_static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        y_eager = fn(x)
        if not torch.equal(y_static, y_eager):
            bad.append(f"T={T} seed={seed}: replay != eager (max |d| {float((y_static.float() - y_eager.float()).abs().max()):.3g})")
    return bad


def _no_sync(fn: Any, T: int) -> list[str]:
    fn(_x(T, 7))  # first call (one-off metadata check on n > 1)
    x = _x(T, 8)  # before the check: a host-to-device copy of the input is a sync itself
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x)
    except RuntimeError as e:
        return [f"T={T}: host sync in the decode step: {str(e).splitlines()[0][:200]}"]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return []


def _world1() -> list[str]:
    from spmd_moe import ParallelContext
    from spmd_moe import replicated_decode as rd

    pctx = ParallelContext.from_group(dist.group.WORLD, "tp")
    bad: list[str] = []
    m = _layer(pctx, kernels="torchtitan")
    with torch.inference_mode():
        for T in DECODE_T:
            bad += [f"layer {p}" for p in _replays_match(m, T)]
            bad += [f"layer {p}" for p in _no_sync(m, T)]
            bad += [f"all-reduce path {p}" for p in _replays_match(lambda x: rd.forward(m, x), T)]
            bad += [f"all-reduce path {p}" for p in _no_sync(lambda x: rd.forward(m, x), T)]
        assert pctx.comm is not None
        comm = pctx.comm
        buf = torch.ones(4, D, device="cuda", dtype=torch.bfloat16)
        graph, out = _capture(lambda b: comm.all_reduce(b.clone()), buf)
        buf.fill_(3.0)
        graph.replay()
        torch.cuda.synchronize()
        if not bool((out == 3.0).all()):
            bad.append("TorchComm all_reduce (NCCL, world 1): replay gave the wrong sum")
    return bad


def _world2(rank: int, world: int, port: int, q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    bad: list[str] = []
    try:
        from spmd_moe import ParallelContext
        from spmd_moe import replicated_decode as rd

        pctx = ParallelContext.from_group(dist.group.WORLD, "tp")
        fast = _layer(pctx, kernels="torchtitan")  # the torch ops: bitwise the split path
        ref = _layer(pctx, dispatcher="all_gather")
        fused = _layer(pctx)  # kernels='fast': the decode kernels per rank, one fp32 all-reduce
        with torch.inference_mode():
            for T in DECODE_T:
                if not rd.applies(fast, T):
                    bad.append(f"T={T}: the all-reduce path does not apply")
                bad += _no_sync(fast, T)
                bad += _replays_match(fast, T)
                x = _x(T, 11)
                if not torch.equal(fast(x), ref(x)):
                    bad.append(f"T={T}: all-reduce path != all_gather dispatcher path")
                # The fused kernels: capturable, sync-free, and within 3 bf16 ulps of max|y|
                # of the torch path (fp32 partial sums rounded once vs bf16 terms and adds;
                # tests/test_replicated_decode.py).
                if not rd.fused_applies(fused, x):
                    bad.append(f"T={T}: the fused kernels do not apply")
                bad += [f"fused {p}" for p in _no_sync(fused, T)]
                bad += [f"fused {p}" for p in _replays_match(fused, T)]
                y_f, y_r = fused(x).double(), ref(x).double()
                ulps = float((y_f - y_r).abs().max()) / (float(y_r.abs().max()) * 2.0**-8)
                if ulps > 3.0:
                    bad.append(f"T={T}: fused kernels {ulps:.2f} bf16 ulps from the all_gather path")
            # As VllmComm on CUDA: the all-reduce path at every size (vLLM captures decode
            # batches up to its largest capture size), no host sync past decode_max_tokens.
            setattr(pctx.comm, "replicated_max_tokens", 1 << 30)
            for T in (100, 256):
                bad += [f"hinted {p}" for p in _no_sync(fast, T)]
                bad += [f"hinted {p}" for p in _replays_match(fast, T)]
    except Exception as e:  # noqa: BLE001 - reported to the parent
        bad.append(f"{type(e).__name__}: {e}")
    q.put((rank, bad))
    dist.destroy_process_group()


@needs_cuda
def test_world1_capture_and_no_sync() -> None:
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    bad = _world1()
    assert not bad, "\n".join(bad)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.timeout(300)
def test_world2_all_reduce_path_capture() -> None:
    from dist_utils import nccl_world_problems

    bad = nccl_world_problems(_world2, 2)
    assert not bad, "\n".join(bad)
