"""The parallel context: which ranks share one MoE layer's tokens and experts.

One mesh axis, the *expert axis*, does both jobs in TP2EP: tokens are split over it
(R -> V) and experts are sharded E/n per rank over it. Size 1 means one device and
every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, overload

import torch
import torch.distributed as dist

from spmd_moe.errors import ConfigError, DistributedError
from spmd_moe.placement import EP, A, Axis


@dataclass(frozen=True, eq=False)
class ParallelContext(Generic[A]):
    """A process group playing the role of mesh axis ``A`` (``ParallelContext[EP]`` is
    the layer's expert axis). ``name`` is the group's name in messages ('tp' in vLLM);
    ``axis`` is the role the static types name (``EP``, ``DP`` or your own ``Axis``)."""

    group: dist.ProcessGroup | None = None
    name: str = "ep"
    axis: type[Axis] = field(default=EP)

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    # ------------------------------------------------------------ constructors
    @staticmethod
    def single() -> ParallelContext[EP]:
        """One device: every collective is the identity."""
        return ParallelContext[EP](None, "ep", EP)

    @overload
    @staticmethod
    def from_group(group: dist.ProcessGroup | None, name: str = "tp") -> ParallelContext[EP]: ...

    @overload
    @staticmethod
    def from_group(group: dist.ProcessGroup | None, name: str = "tp", *, axis: type[A]) -> ParallelContext[A]: ...

    @staticmethod
    def from_group(group: dist.ProcessGroup | None, name: str = "tp", *, axis: type[Axis] = EP) -> ParallelContext[Any]:
        """From a ProcessGroup (vLLM's TP group is one: ``get_tp_group().device_group``);
        ``axis`` is the role it plays (default: the expert axis)."""
        return ParallelContext[Any](group, name, axis)

    @staticmethod
    def from_mesh(mesh: Any, dim: str) -> ParallelContext[EP]:
        """From a torch DeviceMesh and the name of its expert-axis dim."""
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if dim not in names:
            raise ConfigError(
                f"DeviceMesh: expected a dim named '{dim}', got dims {tuple(names)}. "
                f"Fix: build the mesh with mesh_dim_names containing '{dim}'."
            )
        return ParallelContext[EP](mesh.get_group(dim), dim, EP)

    @staticmethod
    def from_parallel_dims(parallel_dims: Any) -> ParallelContext[EP]:
        """From torchtitan's ParallelDims: the 'ep' mesh if EP is on, else one device."""
        if getattr(parallel_dims, "ep_enabled", False):
            mesh = parallel_dims.get_optional_mesh("ep")
            if mesh is None:
                raise DistributedError(
                    "ParallelDims: ep_enabled but no 'ep' mesh was built. "
                    "Fix: call parallel_dims.build_mesh() before parallelize()."
                )
            return ParallelContext[EP](mesh.get_group(), "ep", EP)
        return ParallelContext.single()

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
