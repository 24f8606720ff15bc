"""Entry of ``spmd-moe bench``: the MoE layer benchmark and the debug-off overhead.

    spmd-moe bench --json [--plot FILE.png] [--full]
    python -m spmd_moe.apps.bench.run --json --full --plot docs/moe_h100.png --out result.json

Prints a markdown table (or, with --json, one JSON object) on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _overhead(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from spmd_moe.apps.bench import overhead
    except ImportError as e:
        return {"skipped": f"spmd_moe.apps.bench.overhead not available: {e}"}
    try:
        out: dict[str, Any] = overhead.run(args)
        return out
    except Exception as e:  # report, keep the MoE numbers
        return {"error": f"{type(e).__name__}: {e}"}


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = parse(sys.argv[1:])
    from spmd_moe.apps.bench import moe_bench
    from spmd_moe.apps.progress import progress

    plot_path = getattr(args, "plot", None)
    n_tokens = len(moe_bench.planned_tokens(args))
    with progress("bench", total=n_tokens + 1 + bool(plot_path), unit="step") as prog:
        moe_bench.PROGRESS = prog
        try:
            t0 = time.perf_counter()
            prog.status("MoE layer vs torchtitan, per token count ...")
            res = moe_bench.run(args)
            prog.status("overhead (debug off vs the bare layer) ...")
            res["overhead"] = _overhead(args)
            prog.step("overhead done")
            res["wall_s"] = time.perf_counter() - t0
            if plot_path:
                try:
                    moe_bench.plot(res, plot_path)
                    res["plot"] = plot_path
                except ImportError as e:
                    res["plot"] = f"not written: {e} (pip install matplotlib)"
                    moe_bench.log(str(res["plot"]))
                prog.step(f"plot: {res['plot']}")
        finally:
            moe_bench.PROGRESS = None
        for r in res["rows"]:
            sp = r.get("speedup_fwd_vs_titan")
            prog.record(f"T={r['T']}", f"spmd fwd {r['spmd_fwd_ms']:.3f} ms"
                        + (f", {sp:.2f}x torchtitan" if sp is not None else ""))
        prog.record("plot", res.get("plot", "not asked (--plot FILE.png)"))
    out_path = getattr(args, "out", None)
    text = json.dumps(res, indent=1, default=str)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
    if getattr(args, "json", False):
        print(text)
    else:
        print(moe_bench.table(res))
        print(json.dumps({"targets": res["targets"], "overhead": res["overhead"]}, indent=1, default=str))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spmd_moe.apps.bench.run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None)
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="override the T list")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
