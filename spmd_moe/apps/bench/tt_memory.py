"""Where does the layer keep more memory than torchtitan's MoE? (issue 15's +0.73 MB.)

torchtitan's MoE and the adapter's SpmdMoE built from the same torchtitan Config
(debugmodel_moe's MoE: D=256, E=64, top-8, F=768 unless told), the same weights, bf16
parameters and input as under torchtitan's bf16 FSDP, training mode: per module the bytes
kept for backward (saved tensors, by storage), the allocator's live bytes after the
forward, and the peak over forward+backward. ``python -m spmd_moe.apps.bench.tt_memory``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks


def build(D: int, F: int, E: int, K: int, device: str) -> tuple[Any, Any]:
    from spmd_moe.integrations.torchtitan.overrides import spmd_moe

    # Reuse the test's builder: the Config fields torchtitan 0.3.0 wants.
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests"))
    import test_torchtitan_moe as t  # type: ignore[import-not-found]

    t.D, t.F, t.E = D, F, E
    from spmd_moe.config import MoEConfig

    mcfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, score_func="softmax", route_norm=True,
                     load_balance_coeff=1e-3, expert_dtype=torch.bfloat16, kernels="torchtitan")
    tcfg = t.tt_config(mcfg)
    theirs = tcfg.build().to(device)
    ours = spmd_moe(tcfg).build().to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.to(torch.bfloat16).train(), ours.to(torch.bfloat16).train()


def measure(mod: Any, x: torch.Tensor) -> dict[str, Any]:
    saved: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def pack(t_: torch.Tensor) -> torch.Tensor:
        st = t_.untyped_storage()
        saved[st.data_ptr()] = (st.nbytes(), tuple(t_.shape), str(t_.dtype))
        return t_

    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with saved_tensors_hooks(pack, lambda t_: t_):
        y = mod(x)
    r: dict[str, Any] = {"saved_bytes": sum(v[0] for v in saved.values()),
                         "saved": sorted(([*v] for v in saved.values()), key=lambda v: -v[0])}
    if cuda:
        torch.cuda.synchronize(); r["live_after_fwd"] = torch.cuda.memory_allocated() - base
    y.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize(); r["peak_fwd_bwd"] = torch.cuda.max_memory_allocated() - base
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dims", default="256,768,64,8", help="D,F,E,K")
    ap.add_argument("--out")
    a = ap.parse_args()
    D, F, E, K = (int(v) for v in a.dims.split(","))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    theirs, ours = build(D, F, E, K, dev)
    x = torch.randn(a.tokens // 2048 or 1, min(a.tokens, 2048), D, device=dev, dtype=torch.bfloat16)
    res = {}
    for name, mod in (("torchtitan", theirs), ("spmd_moe", ours), ("torchtitan_again", theirs), ("spmd_moe_again", ours)):
        xi = x.detach().clone().requires_grad_()
        res[name] = measure(mod, xi)
        print(name, {k: v for k, v in res[name].items() if k != "saved"})
    for name in ("torchtitan", "spmd_moe"):
        print(name, "saved:", res[name]["saved"][:14])
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "dims": a.dims, "tokens": a.tokens, **res}, f, indent=1)


if __name__ == "__main__":
    main()
