"""The parallel context: which ranks share one MoE layer's tokens and experts.

One mesh axis, the *expert axis*, does both jobs in TP2EP: tokens are split over it
(R -> V) and experts are sharded E/n per rank over it. Size 1 means one device and
every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spmd_moe.errors import ConfigError, DistributedError


@dataclass(frozen=True, eq=False)
class ParallelContext:
    group: dist.ProcessGroup | None = None
    name: str = "ep"

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    # ------------------------------------------------------------ constructors
    @classmethod
    def single(cls) -> ParallelContext:
        return cls(None, "ep")

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None, name: str = "tp") -> ParallelContext:
        """From a ProcessGroup (vLLM's TP group is one: ``get_tp_group().device_group``)."""
        if group is None or dist.get_world_size(group) == 1:
            return cls(None if group is None else group, name)
        return cls(group, name)

    @classmethod
    def from_mesh(cls, mesh: Any, dim: str) -> ParallelContext:
        """From a torch DeviceMesh and the name of its expert-axis dim."""
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if dim not in names:
            raise ConfigError(
                f"DeviceMesh: expected a dim named '{dim}', got dims {tuple(names)}. "
                f"Fix: build the mesh with mesh_dim_names containing '{dim}'."
            )
        return cls(mesh.get_group(dim), dim)

    @classmethod
    def from_parallel_dims(cls, parallel_dims: Any) -> ParallelContext:
        """From torchtitan's ParallelDims: the 'ep' mesh if EP is on, else one device."""
        if getattr(parallel_dims, "ep_enabled", False):
            mesh = parallel_dims.get_optional_mesh("ep")
            if mesh is None:
                raise DistributedError(
                    "ParallelDims: ep_enabled but no 'ep' mesh was built. "
                    "Fix: call parallel_dims.build_mesh() before parallelize()."
                )
            return cls(mesh.get_group(), "ep")
        return cls.single()

    # ------------------------------------------------------------ expert sharding
    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """[start, stop) of the experts this rank owns."""
        n = self.size
        if num_experts % n != 0:
            raise ConfigError(
                f"num_experts: expected divisible by the size {n} of axis '{self.name}', "
                f"got {num_experts}. Fix: choose an EP size that divides the experts."
            )
        per = num_experts // n
        return self.rank * per, (self.rank + 1) * per

    def device(self) -> torch.device:
        return torch.device("cpu")
