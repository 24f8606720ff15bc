"""spmd_moe: Mixture-of-Experts layers whose tensors carry explicit SPMD placements."""

from spmd_moe._debug import debug, is_debug, set_debug
from spmd_moe.batch_invariant import batch_invariant as batch_invariant_mode
from spmd_moe.batch_invariant import is_batch_invariant, set_batch_invariant
from spmd_moe.config import MoEConfig
from spmd_moe.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    DistributedError,
    DtypeError,
    PaddingError,
    PlacementError,
    RoutingError,
    ShapeError,
    SpmdMoeError,
)
from spmd_moe.experts import GroupedExperts, SharedExperts
from spmd_moe.moe import MoE
from spmd_moe.parallel import ParallelContext
from spmd_moe.router import TopKRouter

__all__ = [
    "CheckpointError", "ConfigError", "DeviceError", "DistributedError", "DtypeError",
    "GroupedExperts", "MoE", "MoEConfig", "PaddingError", "ParallelContext", "PlacementError",
    "RoutingError", "ShapeError", "SharedExperts", "SpmdMoeError", "TopKRouter",
    "batch_invariant_mode", "debug", "is_batch_invariant", "is_debug", "set_batch_invariant", "set_debug",
]
