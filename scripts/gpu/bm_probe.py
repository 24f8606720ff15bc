"""Probe (session 5): do the invariant bf16 GEMM and fused up kernels give a row the same
bits whatever the row tile BM (and BN, warps, stages)? Tensor-core dots (wgmma at BM >= 64,
mma.sync below): if every config agrees bitwise, the decode form may take small row tiles.
Prints one line per kernel and config: equal or the number of differing elements."""
import torch

from spmd_moe.kernels import invariant_gemm as ig

torch.manual_seed(0)
dev = "cuda"
R, D, F, E = 300, 2048, 768, 4
x = torch.randn(R, D, device=dev).to(torch.bfloat16)
w1 = (torch.randn(E, F, D, device=dev) * 0.03).to(torch.bfloat16)
w3 = (torch.randn(E, F, D, device=dev) * 0.03).to(torch.bfloat16)
w2 = (torch.randn(E, D, F, device=dev) * 0.03).to(torch.bfloat16)
counts = torch.tensor([100, 0, 150, 50], device=dev, dtype=torch.int32)
h_in = torch.randn(R, F, device=dev).to(torch.bfloat16)
gemm_cfgs = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (32, 128, 64, 4, 3),
             (16, 128, 64, 4, 3), (16, 64, 64, 4, 4), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)]
up_cfgs = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3), (16, 32, 64, 4, 4),
           (128, 32, 64, 8, 3), (64, 32, 64, 4, 4)]
orig = ig._config
for name, cfgs in (("down gemm", gemm_cfgs), ("swiglu up", up_cfgs)):
    outs = []
    for c in cfgs:
        ig._config = lambda *a, c=c, **k: c  # type: ignore[misc]
        try:
            if name == "down gemm":
                o = ig._launch(h_in, w2, w2.stride(), D, counts, torch.bfloat16, counts=True)
            else:
                o = ig._up(x, w1, w3, counts, counts=True, save=False)[0]
            torch.cuda.synchronize()
            outs.append(o)
        except Exception as e:  # a config that does not compile
            outs.append(None)
            print(name, c, "error", type(e).__name__, str(e)[:120])
    ig._config = orig
    ref = outs[0]
    for c, o in zip(cfgs, outs):
        if o is not None:
            n = int((o != ref).sum().item())
            print(f"{name} {c}: {'EQUAL' if n == 0 else f'{n} differ of {o.numel()}'}")
