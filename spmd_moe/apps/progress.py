"""Progress and end-of-run summary for the long `spmd-moe` verbs (demo, bench, parity, check).

One helper for every verb, built on tqdm (a dependency of the package). Progress goes to
stderr so a verb's ``--json`` output stays alone on stdout; the summary is one block on
stderr at the end (plus whatever the verb prints on stdout itself)::

    from spmd_moe.apps.progress import progress

    with progress("parity", total=3, unit="stage") as p:
        p.step("generator (vLLM) ...")      # advances the bar, shows the stage
        ...
        p.record("tokens equal", "4/4")     # a summary row
        p.step("trainer replay ...")
        ...
    # on exit, stderr:  [parity] done in 12.3 s (3/3 stage)
    #                     tokens equal: 4/4

On a terminal the bar redraws in place; with stderr not a terminal (CI logs, tests, a pipe)
the bar is off and each step is one line (``[parity 13:53:09] 2/3 trainer replay ...``), so
logs stay readable. ``SPMD_MOE_PROGRESS=0`` turns the bar off on a terminal too; the
summary is always printed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]  # no stubs in .venv


class Progress:
    """A stage counter with a tqdm bar on stderr and summary rows."""

    def __init__(self, name: str, total: int | None, unit: str, stream: IO[str]) -> None:
        self.name = name
        self.unit = unit
        self.stream = stream
        self.rows: list[tuple[str, str]] = []
        self.done = 0
        self.total = total
        self.t0 = time.perf_counter()
        off = os.environ.get("SPMD_MOE_PROGRESS", "1") in ("0", "false", "no")
        self.lines = off or not _isatty(stream)
        self._bar: Any = tqdm(
            total=total, desc=f"[{name}]", unit=unit, file=stream, disable=self.lines,
            dynamic_ncols=True, leave=True, mininterval=0.0,
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}"
            if total is not None else "{desc} {n_fmt} {unit} {elapsed}",
        )

    def _show(self, what: str) -> None:
        if self.lines:
            count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
            self.log(f"{count} {what}")
        else:
            self._bar.set_description_str(f"[{self.name}] {what}", refresh=True)

    def step(self, what: str, n: int = 1) -> None:
        """Finish n units (the previous stage) and show what runs next."""
        self.done += n
        self._bar.update(n)
        self._show(what)

    def status(self, what: str) -> None:
        """Show what runs now without advancing."""
        self._show(what)

    def log(self, msg: str) -> None:
        """A line above the bar (does not break the bar on a terminal)."""
        self._bar.write(f"[{self.name} {time.strftime('%H:%M:%S')}] {msg}", file=self.stream)

    def record(self, key: str, value: object) -> None:
        """A row of the end-of-run summary."""
        self.rows.append((key, str(value)))

    def summary(self, ok: bool | None = None) -> str:
        head = f"[{self.name}] "
        if ok is not None:
            head += "PASS " if ok else "FAIL "
        head += f"done in {time.perf_counter() - self.t0:.1f} s"
        if self.total is not None:
            head += f" ({self.done}/{self.total} {self.unit})"
        width = max((len(k) for k, _ in self.rows), default=0)
        return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in self.rows)])

    def close(self, ok: bool | None = None) -> None:
        self._bar.close()
        print(self.summary(ok), file=self.stream, flush=True)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress(name: str, total: int | None = None, unit: str = "stage", stream: IO[str] | None = None) -> Iterator[Progress]:
    """A progress bar named ``name`` over ``total`` units; prints the summary on exit
    (also when the body raises: the summary then says how far it got)."""
    p = Progress(name, total, unit, stream if stream is not None else sys.stderr)
    ok: bool | None = None
    try:
        yield p
    except BaseException:
        ok = False
        raise
    finally:
        p.close(ok)
