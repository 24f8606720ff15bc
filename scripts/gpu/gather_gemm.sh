#!/bin/bash
# Issue 12, prefill: the gather-fused up projection (spmd_moe/kernels/gather_gemm.py) on one
# H200, side by side in one process (Qwen3-30B-A3B layer: D=2048, F=768, E=128, top-8, bf16):
#   1. the kernel alone, per launch shape, against what it replaces (x gather + two cutlass
#      grouped GEMMs + the SwiGLU kernel) on the same routed slots, T=4096 and 32768: CUDA-event
#      medians, the max difference to the unfused h (bf16 ulps of max|h|);
#   2. the layer's inference forward: kernels='fast' with the fused kernel (the best shape of 1)
#      and without (SPMD_MOE_GATHER_GEMM off), torchtitan 0.3.0's MoE; 3 rounds in turn, median;
#      the fast forward's kernel profile and host syncs at T=32768;
#   3. in the time left, the CUDA run of tests/test_gather_gemm.py.
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/gather_gemm.sh")   (< 200 s)
# Writes $OUT/gather_gemm.json and $OUT/gather_gemm.log.
set -u
t0=$SECONDS
source scripts/gpu/common.sh
with_torchtitan
LOG="$OUT/gather_gemm.log"; JSON="$OUT/gather_gemm.json"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$LOG"
timeout ${GG_BENCH_S:-150} python3 - "$JSON" >> "$LOG" 2>&1 <<'PY'
import dataclasses, json, os, statistics, sys, time
import torch
import spmd_moe as sm
from spmd_moe.apps.bench import moe_bench as mb
from spmd_moe.apps.bench.gpu_profile import host_syncs, kernel_split
from spmd_moe.experts import grouped_mm
from spmd_moe.kernels import fused_bwd as fb
from spmd_moe.kernels import gather_gemm as gg

out_path = sys.argv[1]
dev = torch.device("cuda")
sh = mb.shapes_for(True, dev)
fast = mb.build_spmd(sh, dev)
have_titan, why = mb.titan_available()
titan = mb.build_titan(sh, dev) if have_titan else None
mb.share_weights(fast, titan, sh, dev)
ex, K = fast.experts, sh.top_k
res = {"machine": mb.machine_info(dev), "torchtitan": "0.3.0" if have_titan else f"unavailable: {why}", "kernel": [], "layer": []}


def log(msg):
    print(f"[gather_gemm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save():
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


SHAPES = [dict(BM=128, BN=128, BK=32, warps=8, stages=5, tma=1), dict(BM=128, BN=128, BK=32, warps=8, stages=4, tma=1),
          dict(BM=128, BN=128, BK=32, warps=8, stages=6, tma=1), dict(BM=128, BN=128, BK=64, warps=8, stages=4, tma=1),
          dict(BM=128, BN=128, BK=64, warps=8, stages=3)]
best = None
with torch.no_grad():
    for T in (4096, 32768):
        reps = 20
        xs = [torch.randn(T, sh.dim, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        routed = []
        for x in xs:  # the layer's own router and local dispatcher: realistic expert loads
            w, ids = fast.router.fast_route(x, None)
            slots, counts, _ = fast.prefill_dispatcher.sorted_slots(ids, 0)
            routed.append((x, slots, counts))

        def unfused(i):
            x, slots, counts = routed[i % len(routed)]
            xr = x[(slots // K).int()]
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            return fb.swiglu_forward(grouped_mm(xr, ex.w1_EFD, counts, zero_tail=False, offs_e=offs),
                                     grouped_mm(xr, ex.w3_EFD, counts, zero_tail=False, offs_e=offs))

        row = {"T": T, "unfused_ms": mb.timer(dev, unfused, reps)}
        x, slots, counts = routed[0]
        xr = x[(slots // K).int()]
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        row["gather_ms"] = mb.timer(dev, lambda i: routed[i % 4][0][(routed[i % 4][1] // K).int()], reps)
        row["two_gemms_ms"] = mb.timer(dev, lambda i: (grouped_mm(xr, ex.w1_EFD, counts, zero_tail=False, offs_e=offs),
                                                      grouped_mm(xr, ex.w3_EFD, counts, zero_tail=False, offs_e=offs)), reps)
        ref = unfused(0).float()
        ulp = 2.0 ** -7 * float(ref.abs().max())
        for cfg in SHAPES:
            name = "bm{BM}_bn{BN}_bk{BK}_w{warps}_s{stages}".format(**cfg) + ("_tma" if cfg.get("tma") else "")
            try:
                got = gg.gathered_swiglu(x, slots, counts, ex.w1_EFD, ex.w3_EFD, K, launch=cfg).float()
                d = (got - ref).abs()
                row[f"{name}_ms"] = mb.timer(dev, lambda i, cfg=cfg: gg.gathered_swiglu(
                    *routed[i % 4], ex.w1_EFD, ex.w3_EFD, K, launch=cfg), reps)
                row[f"{name}_max_diff_ulps_of_max"] = float(d.max()) / ulp
                row[f"{name}_frac_elems_differ"] = float((d > 0).float().mean())
                tflops = 2 * 2 * slots.numel() * sh.dim * sh.hidden / (row[f"{name}_ms"] * 1e-3) / 1e12
                row[f"{name}_tflops"] = tflops
                log(f"T={T} {name}: {row[f'{name}_ms']:.3f} ms ({tflops:.0f} TFLOP/s) vs unfused {row['unfused_ms']:.3f}; "
                    f"max diff {row[f'{name}_max_diff_ulps_of_max']:.3f} ulp(max|h|)")
                if T == 32768 and (best is None or row[f"{name}_ms"] < best[1]):
                    best = (cfg, row[f"{name}_ms"])
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"T={T} {name}: {row[f'{name}_error']}")
        # Controls: the best pointer and TMA shapes on rows already gathered (slot r*K: token r),
        # i.e. what the gather costs inside the kernel; cutlass with w1 and w3 as one [E, 2F, D] GEMM.
        ident = torch.arange(slots.numel(), device=dev) * K
        for cfg in (SHAPES[0], SHAPES[-1]):
            name = "bm{BM}_bn{BN}_bk{BK}_w{warps}_s{stages}".format(**cfg) + ("_tma" if cfg.get("tma") else "")
            try:
                row[f"nogather_{name}_ms"] = mb.timer(dev, lambda i, cfg=cfg: gg.gathered_swiglu(
                    xr, ident, counts, ex.w1_EFD, ex.w3_EFD, K, launch=cfg), reps)
            except Exception as e:
                row[f"nogather_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        w13 = torch.cat([ex.w1_EFD, ex.w3_EFD], dim=1)
        row["cutlass_w13_one_gemm_ms"] = mb.timer(dev, lambda i: grouped_mm(xr, w13, counts, zero_tail=False, offs_e=offs), reps)
        del w13
        log(f"T={T} controls: " + json.dumps({k: v for k, v in row.items() if k.startswith(("nogather", "cutlass"))}))
        res["kernel"].append(row)
        save()
        del xs, routed, xr, ref
    if best is not None:
        gg.LAUNCH.update(best[0])
    res["launch"] = dict(gg.LAUNCH)
    log(f"launch {gg.LAUNCH}")

    def fwd(name, x):
        gg.GATHER_GEMM = name == "fast"
        try:
            if name == "titan":
                return titan(x.unsqueeze(0)).squeeze(0)
            return fast(x)
        finally:
            gg.GATHER_GEMM = True

    names = ["fast", "fast_unfused"] + (["titan"] if titan is not None else [])
    for T in (4096, 32768):
        reps = 30 if T <= 4096 else 15
        xs = [torch.randn(T, sh.dim, device=dev, dtype=torch.bfloat16) for _ in range(8)]
        row = {"T": T}
        y = {n: fwd(n, xs[0]) for n in names}
        ymax = float(y["fast_unfused"].abs().max())
        for a, b in (("fast", "fast_unfused"), ("fast", "titan"), ("fast_unfused", "titan")):
            if b in y:
                row[f"max_abs_diff_{a}_vs_{b}"] = float((y[a].double() - y[b].double()).abs().max())
        row["max_abs_unfused"] = ymax
        del y
        rounds = {n: [] for n in names}
        for _ in range(3):
            for n in names:
                rounds[n].append(mb.timer(dev, lambda i, n=n: fwd(n, xs[i % len(xs)]), reps))
        for n in names:
            row[f"{n}_fwd_ms"] = statistics.median(rounds[n])
            row[f"{n}_fwd_ms_rounds"] = rounds[n]
            if "titan_fwd_ms" in row or n == "titan":
                pass
        if titan is not None:
            for n in ("fast", "fast_unfused"):
                row[f"speedup_{n}_vs_titan"] = row["titan_fwd_ms"] / row[f"{n}_fwd_ms"]
        if T == 32768:
            row["host_syncs_fast_fwd"] = host_syncs(lambda: fwd("fast", xs[1]))
            from torch.profiler import ProfilerActivity, profile
            for n in ("fast", "fast_unfused"):
                fwd(n, xs[2])
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fwd(n, xs[2])
                    torch.cuda.synchronize()
                row[f"{n}_fwd_profile"] = kernel_split(prof, 3)
            rep = mb.try_graph(dev, fast, xs)
            if rep is not None:
                row["fast_fwd_graph_ms"] = mb.timer(dev, rep, reps)
                del rep
        res["layer"].append(row)
        log(f"T={T} " + json.dumps({k: v for k, v in row.items() if not k.endswith("_profile")}))
        save()
        del xs
        torch.cuda.empty_cache()
save()
PY
echo "bench rc=$? in $((SECONDS - t0)) s"
left=$((${GG_TOTAL_S:-190} - (SECONDS - t0))); [ $left -gt 60 ] && left=60
if [ $left -ge 10 ]; then
  timeout $left python3 -m pytest -q -p no:cacheprovider tests/test_gather_gemm.py \
    "tests/test_fused_backward.py::test_layer_inference_torch_ops_elsewhere" \
    "tests/test_fused_backward.py::test_layer_inference_takes_fused_swiglu_forward" >> "$LOG" 2>&1
  echo "pytest rc=$? (cap ${left} s)"; grep -E "passed|failed|error" "$LOG" | tail -2 | cut -c1-300
fi
python3 - "$JSON" <<'PY' 2>/dev/null || tail -20 "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
for k in r["kernel"]:
    shapes = sorted((v, n[:-3]) for n, v in k.items() if n.endswith("_ms") and n.startswith("bm"))
    print(f"T={k['T']} controls", {n: round(v, 3) for n, v in k.items() if n.startswith(("nogather", "cutlass"))})
    print(f"T={k['T']} unfused {k['unfused_ms']:.3f} ms (gather {k['gather_ms']:.3f}, two GEMMs {k['two_gemms_ms']:.3f}); fused: "
          + "; ".join(f"{n} {v:.3f} ({k[n + '_tflops']:.0f} TF, {k[n + '_max_diff_ulps_of_max']:.2f} ulp)" for v, n in shapes[:6]))
print("launch", r.get("launch"))
for x in r["layer"]:
    print(f"T={x['T']} fwd ms: fast {x['fast_fwd_ms']:.3f} unfused {x['fast_unfused_fwd_ms']:.3f} titan {x.get('titan_fwd_ms', 0):.3f} "
          f"-> x{x.get('speedup_fast_vs_titan', 0):.3f} (unfused x{x.get('speedup_fast_unfused_vs_titan', 0):.3f}); "
          f"diff vs unfused {x['max_abs_diff_fast_vs_unfused']:.3g} of max {x['max_abs_unfused']:.3g}; graph {x.get('fast_fwd_graph_ms')}; "
          f"syncs {x.get('host_syncs_fast_fwd')}")
    for n in ("fast", "fast_unfused"):
        p = x.get(f"{n}_fwd_profile")
        if p:
            print(f"  {n}: {p['device_ms_per_call']} ms busy, {p['kernels_per_call']:.0f} kernels; "
                  + "; ".join(f"{kk[:40]} {v}" for kk, v in p["top_kernels_ms"][:7]))
PY
echo "total $((SECONDS - t0)) s"
