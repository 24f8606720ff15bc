"""The copy-engine transport of the fixed-size exchange's local-first inference (issue 13,
spmd_moe.dispatch._transport).

* CPU: on gloo it does not apply, and the layer says why (the NCCL transport runs;
  tests/test_sync_free_ep.py checks that path).
* One GPU: the receive wait returns once every peer's flag is set and resets them (its
  own rank's flag is never waited for); with a flag never set it ends the process within
  the timeout with its message (a subprocess), instead of hanging.
* Two GPUs (an NCCL world of 2): the layer over copy engines against the same layer over
  NCCL, bitwise: only the transport differs, and each expert sees the same rows in the
  same order at the same offsets (the own segment's rows carry expert id E and sort
  last); against every segment exchanged (SPMD_MOE_EP_LOCAL_FIRST=0, session 7's path)
  and against the one-GPU layer within 6 bf16 ulps of max|y| (each side is within 3 of a
  float64 loop: tests/test_sync_free_ep.py); T grows and shrinks (the buffers grow, the
  own segment's rows are re-marked), routing skewed onto one rank; no host sync; a CUDA
  graph of the layer replayed on new tokens equals eager (SPMD_MOE_EP_LOCAL_FIRST=1
  throughout: 'auto' takes local first from 8192 tokens per rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D, F_HID, E, K = 256, 128, 16, 4


def test_gloo_takes_the_nccl_transport() -> None:
    from dist_utils import run_distributed

    reasons = run_distributed(_gloo_reason, 2, timeout=60)
    assert all(r == "not CUDA, or one rank" for r in reasons), reasons


def _gloo_reason(rank: int, n: int) -> str | None:
    from spmd_moe import ParallelContext
    from spmd_moe.dispatch import _transport

    return _transport.copy_engine_unavailable(ParallelContext.from_group(dist.group.WORLD, "tp"), torch.device("cpu"))


@needs_cuda
def test_wait_kernel_returns_and_resets() -> None:
    from spmd_moe.kernels import _lazy

    k = _lazy.load("_flag_wait_triton").wait_flags_kernel
    flags = torch.tensor([7, 1, 0, 1, 1], dtype=torch.uint32, device="cuda")  # slots 1..4: ranks 0..3, rank 1 is me
    k[(1,)](flags, 1, 1, int(5e9), N=4)
    torch.cuda.synchronize()
    assert flags.tolist() == [7, 0, 0, 0, 0]  # ranks 0, 2, 3 reset; slot 0 and my own untouched


_NEVER_SET = """
import torch
from spmd_moe.kernels import _lazy
flags = torch.zeros(2, dtype=torch.uint32, device="cuda")
_lazy.load("_flag_wait_triton").wait_flags_kernel[(1,)](flags, 0, 0, int(0.5e9), N=2)
torch.cuda.synchronize()
print("RETURNED")
"""


@needs_cuda
@pytest.mark.timeout(120)
def test_wait_kernel_gives_up_with_its_message() -> None:
    p = subprocess.run([sys.executable, "-c", _NEVER_SET], capture_output=True, text=True, timeout=90)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "RETURNED" not in out, out[-2000:]
    assert "a peer's rows never arrived" in out, out[-2000:]


def _layer(pctx: Any, **kw: Any) -> Any:
    from spmd_moe import MoE, MoEConfig

    cfg = MoEConfig(dim=D, hidden_dim=F_HID, num_experts=E, top_k=K, param_dtype=torch.bfloat16, load_balance_coeff=1e-3,
                    dispatcher="all_to_all", **kw)
    m = MoE(cfg, pctx, device="cuda", layout="sequence")
    m.init_states(5)
    return m


def _x(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(torch.bfloat16).cuda()


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / (max(float(b.double().abs().max()), 1e-30) * 2.0**-8)


def _world2(rank: int, world: int, port: int, q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPMD_MOE_EP_LOCAL_FIRST="1")  # at every T here
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    bad: list[str] = []
    try:
        from spmd_moe import MoE, ParallelContext
        from spmd_moe.checkpoint import shard_state_dict
        from spmd_moe.dispatch import _transport

        pctx = ParallelContext.from_group(dist.group.WORLD, "tp")
        why = _transport.copy_engine_unavailable(pctx, torch.device("cuda", rank))
        if why is not None:
            bad.append(f"copy engines do not apply: {why}")
        m = _layer(pctx)
        full = MoE(m.cfg, device="cuda", layout="sequence")
        full.init_states(5)
        m.load_state_dict(shard_state_dict(full.state_dict(), m.cfg, pctx))
        m.prefill_dispatcher.equal_tokens = True

        def run(x: torch.Tensor, **env: str) -> torch.Tensor:
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return m(x)
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

        with torch.inference_mode():
            for T, skew in ((64, False), (1000, False), (3, False), (1000, True), (0, False)):
                if skew:  # every token to the last rank's experts: rank 0's experts get nothing
                    m.expert_bias_E.zero_()
                    m.expert_bias_E[E // 2:] = 1.0
                    full.expert_bias_E.copy_(m.expert_bias_E)
                x_all = torch.cat([_x(T, 100 + j) for j in range(world)])
                x = x_all[rank * T:(rank + 1) * T]
                y = run(x)
                y_nccl = run(x, SPMD_MOE_EP_TRANSPORT="nccl")
                y_seg = run(x, SPMD_MOE_EP_LOCAL_FIRST="0")
                y1 = full(x_all)[rank * T:(rank + 1) * T]
                where = f"T={T} skew={skew}"
                if not torch.equal(y, y_nccl):
                    bad.append(f"{where}: copy engines != NCCL transport ({_ulps(y, y_nccl):.2f} ulps)")
                if T and _ulps(y, y_seg) > 1.0:
                    bad.append(f"{where}: local first {_ulps(y, y_seg):.2f} bf16 ulps of max|y| from every segment exchanged")
                if T and _ulps(y, y1) > 6.0:
                    bad.append(f"{where}: {_ulps(y, y1):.2f} bf16 ulps of max|y| from one GPU")
            m.expert_bias_E.zero_()
            # No host sync in the forward, and a CUDA graph replays it on new tokens.
            T = 512
            x_static = _x(T, 7 + rank)
            m(x_static)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                m(x_static)
            except RuntimeError as e:
                bad.append(f"host sync in the local-first forward: {str(e).splitlines()[0][:200]}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                m(x_static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y_static = m(x_static)
            for seed in (1, 2, 3):
                x_static.copy_(_x(T, 50 * seed + rank))
                g.replay()
                torch.cuda.synchronize()
                y_eager = m(x_static)
                if not torch.equal(y_static, y_eager):
                    bad.append(f"graph replay {seed} != eager ({_ulps(y_static, y_eager):.2f} ulps)")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        bad.append(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    q.put((rank, bad))
    dist.barrier()
    dist.destroy_process_group()


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.timeout(300)
def test_world2_copy_engines() -> None:
    from dist_utils import nccl_world_problems

    bad = nccl_world_problems(_world2, 2)
    assert not bad, "\n".join(bad)
