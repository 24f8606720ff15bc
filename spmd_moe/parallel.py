"""The parallel context: which ranks share one MoE layer's tokens and experts.

One mesh axis, the *expert axis*, does both jobs in TP2EP: tokens are split over it
(R -> V) and experts are sharded E/n per rank over it. Size 1 means one device and
every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generic, overload

import torch
import torch.distributed as dist

from spmd_moe.comm import Comm, MeshComm, TorchComm
from spmd_moe.errors import ConfigError, DistributedError
from spmd_moe.placement import EP, A, Axis


@dataclass(frozen=True, eq=False)
class ParallelContext(Generic[A]):
    """A process group playing the role of mesh axis ``A`` (``ParallelContext[EP]`` is
    the layer's expert axis). ``name`` is the group's name in messages ('tp' in vLLM);
    ``axis`` is the role the static types name (``EP``, ``DP`` or your own ``Axis``).

    ``comm`` moves the collectives' bytes (see spmd_moe.comm): torch.distributed on
    ``group`` unless told otherwise (vLLM's communicator, a DeviceMesh). ``group`` is
    still what spmd_types tracks placements on (debug mode, autograd collectives) and
    what metadata checks use, so placements and checks do not depend on the backend."""

    group: dist.ProcessGroup | None = None
    name: str = "ep"
    axis: type[Axis] = field(default=EP)
    comm: Comm | None = None
    _size: int = field(default=1, init=False, repr=False)
    _rank: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        # Size and rank of a group never change: read once (a forward reads them often).
        if self.group is not None:
            object.__setattr__(self, "_size", dist.get_world_size(self.group))
            object.__setattr__(self, "_rank", dist.get_rank(self.group))
            if self.comm is None:
                object.__setattr__(self, "comm", TorchComm(self.group))

    @property
    def size(self) -> int:
        return self._size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def backend(self) -> Comm:
        """The communicator (only meaningful on an axis of size > 1)."""
        if self.comm is None:
            raise DistributedError(
                f"axis '{self.name}': expected a process group for a collective, got none "
                "(one device). Fix: build the context with ParallelContext.from_group(group)."
            )
        return self.comm

    def with_comm(self, comm: Comm) -> ParallelContext[A]:
        """The same axis, its collectives moved by ``comm`` (whose group must be this one's)."""
        return replace(self, comm=comm)

    # ------------------------------------------------------------ constructors
    @staticmethod
    def single() -> ParallelContext[EP]:
        """One device: every collective is the identity."""
        return ParallelContext[EP](None, "ep", EP)

    @overload
    @staticmethod
    def from_group(group: dist.ProcessGroup | None, name: str = "tp", *, comm: Comm | None = None) -> ParallelContext[EP]: ...

    @overload
    @staticmethod
    def from_group(
        group: dist.ProcessGroup | None, name: str = "tp", *, axis: type[A], comm: Comm | None = None
    ) -> ParallelContext[A]: ...

    @staticmethod
    def from_group(
        group: dist.ProcessGroup | None, name: str = "tp", *, axis: type[Axis] = EP, comm: Comm | None = None
    ) -> ParallelContext[Any]:
        """From a ProcessGroup (vLLM's TP group is one: ``get_tp_group().device_group``);
        ``axis`` is the role it plays (default: the expert axis); ``comm`` the backend
        that moves the bytes (default: torch.distributed on ``group``)."""
        return ParallelContext[Any](group, name, axis, comm)

    @staticmethod
    def from_mesh(mesh: Any, dim: str, *, functional: bool = True) -> ParallelContext[EP]:
        """From a torch DeviceMesh and the name of its expert-axis dim. ``functional``:
        collectives through torch's functional collectives on the mesh (MeshComm);
        False: plain torch.distributed on the dim's group."""
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if dim not in names:
            raise ConfigError(
                f"DeviceMesh: expected a dim named '{dim}', got dims {tuple(names)}. "
                f"Fix: build the mesh with mesh_dim_names containing '{dim}'."
            )
        group = mesh.get_group(dim)
        return ParallelContext[EP](group, dim, EP, MeshComm(mesh, dim) if functional else None)

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
            names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
            comm = MeshComm(mesh, names[0]) if len(names) == 1 else None
            return ParallelContext[EP](mesh.get_group(), "ep", EP, comm)
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
