"""`spmd-moe` command line: demo, bench, parity."""

from __future__ import annotations

import argparse
import json
import sys


def _demo_one_device(args: argparse.Namespace) -> int:
    import torch

    import spmd_moe as sm
    from spmd_moe.checking import checked_calls
    from spmd_moe.placement import as_rep

    torch.manual_seed(0)
    cfg = sm.MoEConfig(dim=64, hidden_dim=32, num_experts=8, top_k=2, score_func="softmax",
                       route_norm=True, shared_hidden_dim=64, load_balance_coeff=1e-3)
    moe = sm.MoE(cfg, device="meta")
    moe.to_empty(device="cpu")
    moe.init_states(seed=0)
    x_TD = torch.randn(24, cfg.dim, requires_grad=True)
    with sm.debug(), checked_calls() as calls:
        y_TD = moe(as_rep(x_TD, moe.pctx, "x_TD"))  # one device: trivially Replicate
        torch.autograd.backward(y_TD.square().mean())
    print(f"MoE forward+backward on one device, debug mode: y {tuple(y_TD.shape)} {y_TD.dtype}")
    for name, n in sorted(calls.items()):
        print(f"  checked {n}x  {name}")
    grads = {k: float(p.grad.norm()) for k, p in moe.named_parameters() if p.grad is not None}
    print(f"  gradients reached {len(grads)} parameters; tokens per expert {moe.tokens_per_expert_E.tolist()}")
    return 0


def _checkout_on_path() -> None:
    """benchmarks/ sits beside the package in the checkout (it is not installed)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "benchmarks")) and root not in sys.path:
        sys.path.insert(0, root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spmd-moe")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: the MoE on the embedded tiny model")
    d.add_argument("--one-device", action="store_true", help="only the one-device debug-mode demo")
    b = sub.add_parser("bench", help="benchmarks (see benchmarks/)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot", default=None)
    b.add_argument("--full", action="store_true", help="GPU shapes (Qwen3-30B-A3B layer)")
    pa = sub.add_parser("parity", help="trainer/generator parity figures")
    pa.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        try:
            from spmd_moe.demo import run_demo  # the vLLM demo, once integrated
        except ImportError:
            return _demo_one_device(args)
        return int(run_demo(args))
    if args.cmd == "bench":
        _checkout_on_path()
        from benchmarks.run import main as bench_main

        return int(bench_main(args))
    if args.cmd == "parity":
        from spmd_moe.parity import main as parity_main

        return int(parity_main(args))
    print(json.dumps({"error": f"unknown command {args.cmd}"}), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
