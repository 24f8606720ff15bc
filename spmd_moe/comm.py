"""Communicator backends: what moves a collective's bytes over the expert axis.

The typed collectives (``spmd_moe.collectives``) state every placement transition and
are the only callers. With autograd off and placements not tracked (inference, debug
off) they call the context's backend; with autograd on or in debug mode they go
through spmd_types on ``ParallelContext.group`` (tracked, differentiable). So the
placements and the debug checks are the same whatever the backend: a backend only
moves bytes, and knows nothing of placements.

Backends:

* ``TorchComm(group)``: torch.distributed on a ProcessGroup (the default).
* ``MeshComm(mesh, dim)``: a torch DeviceMesh dim through functional collectives
  (traceable by torch.compile; torchtitan's meshes).
* ``spmd_moe.integrations.vllm.comm.VllmComm``: vLLM's GroupCoordinator (its device
  communicator: shared memory on CPU, pynccl / custom all-reduce on CUDA). The core
  never imports vLLM.

Contract of every backend (``Comm``): inputs are contiguous, with the same dtype and
(for all_gather, reduce_scatter, all_reduce) the same shape on every rank; dim 0 is the
split dim. Calls are synchronous in stream order: the returned tensor can be used by
the next op on the current stream (CPU: the exchange is done; CUDA: it is enqueued on
the current stream, with no host sync). ``all_reduce`` may reuse its input's storage
(vLLM's CPU shared-memory all-reduce works in place): callers pass a buffer they own.

Optional hint a backend may carry: ``replicated_max_tokens`` (int): up to how many
tokens per rank the layout-'replicated' inference path with one all-reduce
(spmd_moe.replicated_decode) should be used instead of the all-to-all path; absent or
None: MoEConfig.decode_max_tokens. A performance choice only: both paths give the same
bits.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist


@runtime_checkable
class Comm(Protocol):
    """Moves bytes over one group of ranks (see the module docstring for the contract)."""

    name: str
    # Its collectives can be recorded in a CUDA graph: no host sync, no host-side
    # allocation that changes between replays.
    capturable: bool

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[m, ...] on every rank -> [n*m, ...]: the ranks' tensors along dim 0, in rank order."""
        ...

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[n*m, ...] -> [m, ...]: the sum over ranks, this rank's contiguous chunk of dim 0."""
        ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (may reuse ``x``'s storage)."""
        ...

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        """Rows ``[in_splits[j]]`` of dim 0 go to rank j; ``out_splits[j]`` rows come from j."""
        ...


class TorchComm:
    """torch.distributed collectives on one ProcessGroup (gloo, NCCL, ...)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        # NCCL collectives are stream-ordered and capturable; gloo runs on the host.
        self.capturable = dist.get_backend(group) == "nccl"

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=self.group)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((x.shape[0] // self.size, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=self.group)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group)
        return out

    def __repr__(self) -> str:
        return f"TorchComm({dist.get_backend(self.group)}, size={self.size})"


class MeshComm:
    """A torch DeviceMesh dim through functional collectives (what torch.compile traces
    and torchtitan's meshes use). Results are waited on before they are returned."""

    name = "mesh"

    def __init__(self, mesh: Any, dim: str) -> None:
        from torch.distributed import _functional_collectives as funcol

        self._funcol = funcol
        self.mesh = mesh
        self.dim = dim
        self.group = mesh.get_group(dim)
        self.size = dist.get_world_size(self.group)
        self.capturable = dist.get_backend(self.group) == "nccl"

    def _wait(self, t: torch.Tensor) -> torch.Tensor:
        """The functional collective's result, waited on (stream order on CUDA)."""
        out: torch.Tensor = self._funcol.wait_tensor(t)  # type: ignore[no-untyped-call]
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._wait(self._funcol.all_gather_tensor(x, 0, self.group))

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return self._wait(self._funcol.reduce_scatter_tensor(x, "sum", 0, self.group))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._wait(self._funcol.all_reduce(x, "sum", self.group))

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        return self._wait(self._funcol.all_to_all_single(x, out_splits, in_splits, self.group))

    def __repr__(self) -> str:
        return f"MeshComm(dim={self.dim!r}, size={self.size})"
