"""The error hierarchy of spmd_moe.

Every message names the tensor (or config field), the mesh axis or dim, what was
expected, what was found, and the fix. Build messages with :func:`describe` so
they all read the same way.
"""

from __future__ import annotations


def describe(what: str, expected: str, actual: str, fix: str, axis: str | None = None) -> str:
    where = f" on axis '{axis}'" if axis is not None else ""
    return f"{what}{where}: expected {expected}, got {actual}. Fix: {fix}"


class SpmdMoeError(Exception):
    """Base class of every error spmd_moe raises on purpose."""


class ConfigError(SpmdMoeError, ValueError):
    """An invalid MoEConfig field or a config that does not fit the parallel layout."""


class ShapeError(SpmdMoeError, ValueError):
    """A tensor with the wrong rank or size on some dim."""


class DtypeError(SpmdMoeError, TypeError):
    """A tensor with the wrong dtype."""


class DeviceError(SpmdMoeError, ValueError):
    """A tensor on the wrong device (or still on the meta device)."""


class PlacementError(SpmdMoeError, TypeError):
    """A tensor whose SPMD placement on a mesh axis is not the one required."""


class PaddingError(SpmdMoeError, ValueError):
    """A token count that the chosen padding policy does not accept."""


class RoutingError(SpmdMoeError, ValueError):
    """Bad router input (NaN/inf in debug mode) or bad forced routes."""


class CheckpointError(SpmdMoeError, KeyError):
    """Missing, unexpected or mis-shaped weights in a state dict."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class DistributedError(SpmdMoeError, RuntimeError):
    """Ranks that disagree, a group that does not match, a peer that timed out."""
