"""The Triton kernel modules are imported on first use, and only where Triton is present;
the tests run them on a CPU in Triton's interpreter where they opt in."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any


@functools.cache
def load(module: str) -> Any:
    """spmd_moe.kernels.<module> (a module of @triton.jit kernels), or None without Triton."""
    try:
        return importlib.import_module(f"spmd_moe.kernels.{module}")
    except ImportError:
        return None


def interpreting(opt_in: str) -> bool:
    """Triton's CPU interpreter with the tests' opt-in ``opt_in`` (=1) set: there a kernel
    path takes fp32 tensors on the CPU. A CPU layer never takes it otherwise."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(opt_in) == "1"
