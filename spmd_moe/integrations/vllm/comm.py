"""VllmComm: spmd_moe's collectives through vLLM's GroupCoordinator.

Inside vLLM the MoE layers' bytes ride the same communicator as vLLM's own TP layers:
the coordinator's device communicator (on CPU a shared-memory all-reduce / all-gather
when the ranks share a node, else gloo; on CUDA pynccl, the custom all-reduce or
symmetric memory, which vLLM captures in its CUDA graphs). Placements are not this
module's business: spmd_moe.collectives states them and calls this backend only for
the bytes (see spmd_moe.comm for the contract).

The coordinator has no general uneven all_to_all: that one (the prefill dispatcher's,
which needs a host sync for its split sizes anyway) runs on the coordinator's
``device_group`` through torch.distributed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from spmd_moe.errors import ConfigError
from spmd_moe.parallel import ParallelContext
from spmd_moe.placement import EP


# The dtypes vLLM's device communicators reduce and gather (its CPU shared-memory kernels
# have no integer ones); other dtypes move through torch.distributed on device_group.
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class VllmComm:
    """The spmd_moe.comm.Comm protocol over a vLLM GroupCoordinator (``get_tp_group()``)."""

    name = "vllm"

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.group: dist.ProcessGroup = coordinator.device_group
        self.size = int(coordinator.world_size)
        dc = getattr(coordinator, "device_communicator", None)
        # CUDA: every device communicator vLLM builds is capturable (vLLM captures its
        # own TP all-reduce); CPU has no graphs.
        on_cuda = str(getattr(coordinator, "device", "cpu")).startswith("cuda")
        self.capturable = on_cuda and dc is not None
        # Replicated tokens take the one-all-reduce path at every T. On CPU the
        # shared-memory all-reduce is a memcpy-speed exchange while the all-to-all runs on
        # gloo (plus a host sync for its sizes). On CUDA vLLM captures decode batches of
        # up to its largest capture size in CUDA graphs: every such size must take a path
        # with no host sync (the all-to-all path has one).
        self.replicated_max_tokens: int | None = 1 << 30

    @property
    def transport(self) -> str:
        """What moves the bytes (reports, the benchmark): e.g. '_CPUSHMDistributed' on a
        CPU node, 'module' (torch.distributed) when vLLM fell back to gloo."""
        dc = getattr(self.coordinator, "device_communicator", None)
        if dc is None:
            return "none"
        dist_module = getattr(dc, "dist_module", None)
        inner = type(dist_module).__name__ if dist_module is not None else ""
        return f"{type(dc).__name__}:{inner}" if inner else type(dc).__name__

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _FLOAT_DTYPES and x.ndim >= 1 and x.element_size() % 4 == 0 and x.numel() > 0:
            # vLLM's CPU shared-memory all-gather has no integer kernels: move the same
            # bytes as float32 words (a copy, no arithmetic: bit-exact), view them back.
            out_words: torch.Tensor = self.coordinator.all_gather(x.view(torch.float32), 0)
            return out_words.view(x.dtype)
        if x.dtype not in _FLOAT_DTYPES:
            return self._torch_all_gather(x)
        out: torch.Tensor = self.coordinator.all_gather(x, 0)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _FLOAT_DTYPES:  # integer sums: torch.distributed on the group
            buf = x.new_empty((x.shape[0] // self.size, *x.shape[1:]))
            dist.reduce_scatter_tensor(buf, x, group=self.group)
            return buf
        out: torch.Tensor = self.coordinator.reduce_scatter(x, 0)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _FLOAT_DTYPES:  # integer sums: torch.distributed on the group
            dist.all_reduce(x, group=self.group)
            return x
        out: torch.Tensor = self.coordinator.all_reduce(x)
        return out

    def _torch_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        buf = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(buf, x, group=self.group)
        return buf

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group)
        return out

    def __repr__(self) -> str:
        return f"VllmComm({getattr(self.coordinator, 'unique_name', '?')}, size={self.size}, {self.transport})"


# SPMD_MOE_VLLM_COMM=torch: plain torch.distributed on the TP group's device_group (gloo
# on CPU) instead of vLLM's communicator; for measuring what the communicator buys.
COMM_ENV = "SPMD_MOE_VLLM_COMM"


def vllm_tp_context(coordinator: Any | None = None) -> ParallelContext[EP]:
    """The expert axis on vLLM's TP group, its bytes through vLLM's communicator.
    ``coordinator``: a GroupCoordinator (default: ``vllm.distributed.get_tp_group()``)."""
    if coordinator is None:
        from vllm.distributed import get_tp_group

        coordinator = get_tp_group()
    choice = os.environ.get(COMM_ENV, "vllm")
    if choice not in ("vllm", "torch"):
        raise ConfigError(
            f"{COMM_ENV}: expected 'vllm' (vLLM's communicator) or 'torch' (torch.distributed "
            f"on the TP group), got {choice!r}. Fix: unset it or use one of the two."
        )
    comm = VllmComm(coordinator) if choice == "vllm" and int(coordinator.world_size) > 1 else None
    return ParallelContext.from_group(coordinator.device_group, name="tp", comm=comm)
