"""How the fixed-size exchange's local-first inference moves its rows (issue 13): the
tokens each peer needs out, the peers' partial sums back. Two transports, one interface:

* ``NcclTransport``: the communicator's all-to-all (NCCL, gloo), on the side stream on
  CUDA. Its kernels need SMs: under a persistent GEMM they wait for the whole grid.
* ``CopyEngineTransport`` (CUDA, NCCL group, torch symmetric memory): each rank copies a
  peer's segment straight into that peer's buffer with a device-to-device copy (a copy
  engine, no SM) and then sets the peer's flag with a stream memory operation
  (cuStreamWriteValue32, fenced after the copy): nothing on the side stream needs an SM
  or waits, so the transfers run under the GEMMs. The receiver's wait is one small kernel
  on the compute stream (nothing else runs there at that point) that resets the flags
  and gives up with a device-side assertion after SPMD_MOE_EP_TIMEOUT_S (default 600 s,
  as NCCL's watchdog): a peer that fails ends the job in bounded time.

  Why no "buffer free" handshake: a rank sends its tokens of call k+1 only after its
  compute stream has seen the peer's partial sums of call k arrive, which the peer sends
  only after it has read the tokens of call k; and it sends its partial sums of call
  k+1 only after the peer's tokens of call k+1 arrived, which the peer sends only after
  its own sum of call k (the side stream waits for everything the compute stream issued
  before). A wait on the side stream (a stream memory operation) stalled the compute
  stream too in one H200 x2 run (a shared hardware queue, most likely).

Layout: the peers' segments in rank order, this rank's own skipped ((n-1)*T rows:
``send_out``'s input, what ``recv_out`` returns and ``send_back`` takes). ``parts`` is
[n*T, D]: segment j holds rank j's partial sums of the tokens this rank sent it; this
rank's own segment is written by the caller (token order).

SPMD_MOE_EP_TRANSPORT=nccl keeps the all-to-all. Not checked: that every rank passes the
same T (debug mode checks it and takes another path); a rank with another T would wait
for rows that never come, ending at the timeout.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Protocol

import torch

from spmd_moe.dispatch.all_to_all import _Streams
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP


class Transport(Protocol):
    def send_out(self, send_OD: torch.Tensor, meta_OM: torch.Tensor) -> None: ...
    def recv_out(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def send_back(self, part_RD: torch.Tensor) -> None: ...
    def parts(self) -> torch.Tensor: ...
    def recv_back(self, parts_ND: torch.Tensor) -> None: ...
    def join(self) -> None: ...


class NcclTransport:
    """The communicator's all-to-all with this rank's own split empty."""

    def __init__(self, pctx: ParallelContext[EP], st: _Streams, T: int, D: int, ret_dtype: torch.dtype, dev: torch.device):
        self.pctx, self.st, self.T, self.D, self.ret_dtype, self.dev = pctx, st, T, D, ret_dtype, dev
        self.others = [j for j in range(pctx.size) if j != pctx.rank]
        self._splits = [0 if j == pctx.rank else T for j in range(pctx.size)]

    def _a2a(self, x: torch.Tensor) -> torch.Tensor:
        return self.pctx.backend.all_to_all(x.contiguous(), self._splits, self._splits)

    def send_out(self, send_OD: torch.Tensor, meta_OM: torch.Tensor) -> None:
        self.st.to_comm(send_OD, meta_OM)
        with self.st.comm_ctx():
            self._out = (self._a2a(send_OD), self._a2a(meta_OM))
            self._out_ev = self.st.mark()

    def recv_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.st.use(self._out_ev, *self._out)
        return self._out

    def send_back(self, part_RD: torch.Tensor) -> None:
        self.st.comm_wait(self.st.main_mark(), part_RD)
        with self.st.comm_ctx():
            self._back = self._a2a(part_RD)
            self._back_ev = self.st.mark()

    def parts(self) -> torch.Tensor:
        return torch.empty(self.pctx.size * self.T, self.D, dtype=self.ret_dtype, device=self.dev)

    def recv_back(self, parts_ND: torch.Tensor) -> None:
        self.st.use(self._back_ev, self._back)
        T = self.T
        for i, j in enumerate(self.others):  # into the rank-ordered layout (one copy per peer)
            parts_ND[j * T:(j + 1) * T].copy_(self._back[i * T:(i + 1) * T])

    def join(self) -> None:
        pass


# Flag slots (uint32, 2n per rank): ready_out[j] (rank j's tokens are in my buffer),
# ready_back[j] (rank j's partial sums are).
_READY_OUT, _READY_BACK = range(2)


def _stream_write(flags: torch.Tensor, idx: int, val: int) -> None:
    torch.ops.symm_mem.stream_write_value32_(flags, idx, val)


def _group(pctx: ParallelContext[EP]) -> Any:
    """The communicator's process group (TorchComm, MeshComm), or None."""
    return getattr(pctx.backend, "group", None)


def copy_engine_unavailable(pctx: ParallelContext[EP], dev: torch.device) -> str | None:
    """Why the copy-engine transport does not apply here (None: it does)."""
    if os.environ.get("SPMD_MOE_EP_TRANSPORT", "auto") == "nccl":
        return "SPMD_MOE_EP_TRANSPORT=nccl"
    if dev.type != "cuda" or pctx.size < 2:
        return "not CUDA, or one rank"
    if _group(pctx) is None or not getattr(pctx.backend, "capturable", False):
        return "the communicator is not an NCCL process group"
    return _driver_unavailable()


@functools.cache
def _driver_unavailable() -> str | None:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401

        if not hasattr(torch.ops.symm_mem, "stream_write_value32_"):
            return "torch has no symm_mem.stream_write_value32_"
        from spmd_moe.kernels import _lazy

        if _lazy.load("_flag_wait_triton") is None:
            return "no Triton"
    except (ImportError, OSError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class _Buffers:
    """One rank's symmetric buffers for ``cap`` tokens per segment and every peer's view."""

    def __init__(self, pctx: ParallelContext[EP], cap: int, D: int, K: int, x_dtype: torch.dtype,
                 ret_dtype: torch.dtype, dev: torch.device):
        import torch.distributed._symmetric_memory as symm

        n, r = pctx.size, pctx.rank
        name = _group(pctx).group_name
        self.cap = cap

        def make(shape: tuple[int, ...], dt: torch.dtype) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            t = symm.empty(*shape, dtype=dt, device=dev)
            h = symm.rendezvous(t, name)
            return t, {j: h.get_buffer(j, shape, dt) for j in range(n) if j != r}

        self.rows, self.peer_rows = make(((n - 1) * cap, D), x_dtype)
        self.meta, self.peer_meta = make(((n - 1) * cap, 2 * K), torch.float32)
        self.back, self.peer_back = make((n * cap, D), ret_dtype)
        self.flags, self.peer_flags = make((2 * n,), torch.uint32)
        self.flags.zero_()
        torch.cuda.synchronize(dev)
        torch.distributed.barrier(group=_group(pctx))  # no peer writes before this


_BUFFERS: dict[tuple[Any, ...], _Buffers] = {}
_RETIRED: list[_Buffers] = []


def _key(pctx: ParallelContext[EP], dev: torch.device, D: int, K: int, x_dtype: torch.dtype,
         ret_dtype: torch.dtype) -> tuple[Any, ...]:
    return (_group(pctx).group_name, dev, D, K, x_dtype, ret_dtype)


class CopyEngineTransport:
    """Copies into the peers' symmetric buffers, flags by stream memory operations."""

    def __init__(self, pctx: ParallelContext[EP], st: _Streams, T: int, D: int, K: int, x_dtype: torch.dtype,
                 ret_dtype: torch.dtype, dev: torch.device):
        key = _key(pctx, dev, D, K, x_dtype, ret_dtype)
        b = _BUFFERS.get(key)
        if b is None or b.cap < T:  # grow (collective: every rank has this T)
            if b is not None:
                torch.cuda.synchronize(dev)  # the old buffers' exchanges are done
                _RETIRED.append(b)  # never freed: a captured CUDA graph may still use them
            b = _BUFFERS[key] = _Buffers(pctx, max(T, 2 * b.cap if b else 0, 1), D, K, x_dtype, ret_dtype, dev)
        self.b, self.st, self.T, self.n, self.r = b, st, T, pctx.size, pctx.rank
        self.others = [j for j in range(pctx.size) if j != pctx.rank]
        self.timeout_ns = int(float(os.environ.get("SPMD_MOE_EP_TIMEOUT_S", "600")) * 1e9)

    def _push(self, kind_ready: int, pairs: list[tuple[dict[int, torch.Tensor], torch.Tensor]], dst_seg: list[int]) -> None:
        """On the side stream: per peer (the i-th), copy my segment i for it into its buffer
        at segment dst_seg[i], then set its ready flag (the write is fenced after the copy)."""
        b, T, n, r = self.b, self.T, self.n, self.r
        with self.st.comm_ctx():
            for i, j in enumerate(self.others):
                d = dst_seg[i] * T
                for peer, src in pairs:
                    peer[j][d:d + T].copy_(src[i * T:(i + 1) * T], non_blocking=True)
                _stream_write(b.peer_flags[j], kind_ready * n + r, 1)

    def _wait(self, kind_ready: int) -> None:
        """On the compute stream: every peer's ready flag, then reset (bounded: see the module)."""
        from spmd_moe.kernels import _lazy

        _lazy.load("_flag_wait_triton").wait_flags_kernel[(1,)](
            self.b.flags, kind_ready * self.n, self.r, self.timeout_ns, N=self.n)

    def send_out(self, send_OD: torch.Tensor, meta_OM: torch.Tensor) -> None:
        self.st.to_comm(send_OD, meta_OM)
        # In peer j's layout (its own rank skipped) my segment is r, or r-1 past j.
        self._push(_READY_OUT, [(self.b.peer_rows, send_OD), (self.b.peer_meta, meta_OM)],
                   [self.r - (self.r > j) for j in self.others])

    def recv_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._wait(_READY_OUT)
        N = (self.n - 1) * self.T
        return self.b.rows[:N], self.b.meta[:N]

    def send_back(self, part_RD: torch.Tensor) -> None:
        self.st.comm_wait(self.st.main_mark(), part_RD)
        self._push(_READY_BACK, [(self.b.peer_back, part_RD)], [self.r] * len(self.others))

    def parts(self) -> torch.Tensor:
        return self.b.back[: self.n * self.T]

    def recv_back(self, parts_ND: torch.Tensor) -> None:
        self._wait(_READY_BACK)

    def join(self) -> None:
        # The compute stream joins the side stream (its last copies are done by now, as the
        # peers' are): a CUDA graph capture needs every forked stream joined.
        self.st.use(self.st.mark())


def transport(pctx: ParallelContext[EP], st: _Streams, T: int, D: int, K: int, x_dtype: torch.dtype,
              ret_dtype: torch.dtype, dev: torch.device) -> Transport:
    """The copy-engine transport where it applies (copy_engine_unavailable), else NCCL's;
    NCCL's too under a CUDA graph capture that would have to allocate (or grow) the
    symmetric buffers, a collective with a host sync (warm up eagerly at the largest T
    first to capture the copy engines)."""
    if copy_engine_unavailable(pctx, dev) is None:
        b = _BUFFERS.get(_key(pctx, dev, D, K, x_dtype, ret_dtype))
        if (b is not None and b.cap >= T) or not torch.cuda.is_current_stream_capturing():
            return CopyEngineTransport(pctx, st, T, D, K, x_dtype, ret_dtype, dev)
    return NcclTransport(pctx, st, T, D, ret_dtype, dev)
