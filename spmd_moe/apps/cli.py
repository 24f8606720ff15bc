"""`spmd-moe` command line: demo, bench, parity, check."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spmd-moe")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: the MoE on the embedded tiny model")
    d.add_argument("--one-device", action="store_true", help="only the one-device debug-mode demo")
    b = sub.add_parser("bench", help="benchmarks (spmd_moe/apps/bench)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot", default=None)
    b.add_argument("--full", action="store_true", help="GPU shapes (Qwen3-30B-A3B layer)")
    b.add_argument("--out", default=None, help="also write the JSON here")
    pa = sub.add_parser("parity", help="trainer/generator parity figures")
    pa.add_argument("--json", action="store_true")
    from spmd_moe.apps.check_args import add_arguments as check_arguments

    check_arguments(sub.add_parser("check", help="run your model in debug mode on gloo worlds of 2 and 4 CPU ranks over adversarial token counts (docs/check.md)"))
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from spmd_moe.apps.demo import run_demo

        return int(run_demo(args))
    if args.cmd == "bench":
        from spmd_moe.apps.bench.run import main as bench_main

        return int(bench_main(args))
    if args.cmd == "parity":
        from spmd_moe.apps.parity import main as parity_main

        return int(parity_main(args))
    if args.cmd == "check":
        from spmd_moe.apps.check import main as check_main

        return int(check_main(args))
    print(json.dumps({"error": f"unknown command {args.cmd}"}), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
