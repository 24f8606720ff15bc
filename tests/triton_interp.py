"""Running the CUDA kernels' tests on a CPU through Triton's interpreter.

Triton reads TRITON_INTERPRET when it is first imported, which in a pytest process has long
happened: a test file re-runs itself (or the tests matching ``-k``) in a fresh interpreter
with it set and with the library's opt-in variables (SPMD_MOE_*_INTERPRET), which let the
kernels take fp32 tensors on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys


def triton_ok() -> bool:
    """Whether Triton imports (for CUDA or for its interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting(*opt_ins: str) -> bool:
    """Whether this process is such a re-run: TRITON_INTERPRET and every opt-in set to 1."""
    return all(os.environ.get(v) == "1" for v in ("TRITON_INTERPRET", *opt_ins))


def rerun(test_file: str, *opt_ins: str, k: str | None = None, timeout: float = 900) -> str:
    """Run the file's tests (matching ``k``) in a fresh interpreter with TRITON_INTERPRET and
    the opt-ins set; assert it passed and return its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **{v: "1" for v in opt_ins})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file] + (["-k", k] if k else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
    return proc.stdout
