"""The debug switch. Read once per call as a plain bool: costs nothing when off."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_enabled: bool = os.environ.get("SPMD_MOE_DEBUG", "0") not in ("", "0", "false", "False")


def is_debug() -> bool:
    return _enabled


def set_debug(on: bool) -> None:
    global _enabled
    _enabled = on


@contextlib.contextmanager
def debug(on: bool = True) -> Iterator[None]:
    """Turn on runtime checks inside the block: shapes and dtypes, placements verified
    from the values across ranks (never assigned), spmd_types' strict tracking through
    the layer, production kernels compared with their reference (spmd_moe.checking)."""
    global _enabled
    old = _enabled
    _enabled = on
    try:
        yield
    finally:
        _enabled = old
