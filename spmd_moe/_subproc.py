"""Run a child process in its own session and kill the whole group when it ends.

vLLM engine cores and TP workers are grandchildren of the process we start; a plain
subprocess.run (or a timeout) would leave them orphaned, holding GBs of memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import IO, Any


def run_in_session(cmd: list[str], *, stdout: IO[Any], env: dict[str, str], timeout: float) -> int:
    """Return the child's exit code; raise subprocess.TimeoutExpired after ``timeout``.
    Either way nothing the child started survives."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
