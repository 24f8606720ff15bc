"""The arguments of `spmd-moe check` (no heavy imports: the CLI parser stays fast)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="MODULE:FACTORY",
                   help="factory(pctx) -> spmd_moe.MoE | spmd_moe.apps.check.CheckTarget; MODULE is a dotted "
                        "module or a path to a .py file (docs/check.md)")
    p.add_argument("--worlds", default="2,4", help="gloo world sizes to run (default 2,4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout (progress stays on stderr)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per world before ranks that never finish are killed (default 300)")
    p.add_argument("--collective-timeout", type=float, default=30.0,
                   help="seconds a collective of the model waits for a rank that does not join (default 30)")
    p.add_argument("--cases", default=None,
                   help="only these case ids, comma-separated (empty, one, fewer, odd, even, prefill, one_last, ones, "
                        "uneven, uneven_empty, probe); e.g. drop the uneven ones for a layer built with padding='error'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
