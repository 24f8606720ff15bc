#!/bin/bash
# Issue 12, decode T=1 (the slot design, spmd_moe/kernels/decode.py SLOT_TILES): tile shapes of
# the per-slot up and down kernels side by side on one H200, Qwen3-30B-A3B's layer. Each shape's
# CUDA graphs are captured once (one layer a replay; 8 layer copies in one graph), then all are
# timed in turn, 5 rounds of 200 replays, median of the rounds' medians; the output of every
# shape is compared with the default's (tile configs gave equal bits on the H200 in session 5:
# a hardware/compiler fact, checked again here). < 120 s.
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/slot_sweep.sh")
# Writes $OUT/slot_sweep.json and prints one line per shape.
set -u
source scripts/gpu/common.sh
timeout ${SWEEP_CAP:-110} python3 - "$OUT/slot_sweep.json" <<'PY'
import copy, json, statistics, sys, time
import torch
from spmd_moe.apps.bench import moe_bench as mb
from spmd_moe.kernels import decode as dk

dev = torch.device("cuda")
sh = mb.shapes_for(True, dev)
layer = mb.build_spmd(sh, dev)
base = dict(dk.SLOT_TILES)
SHAPES = {"default": {}, "up_f16": {"up_f": 16}, "up_f16_d256": {"up_f": 16, "up_d": 256},
          "up_d256_s4": {"up_d": 256, "stages": 4}, "down_n32": {"down_n": 32}, "up_f16_down_n32": {"up_f": 16, "down_n": 32},
          "stages4": {"stages": 4}, "up_f16_down_n32_s4": {"up_f": 16, "down_n": 32, "stages": 4},
          "down_f256": {"down_f": 256}}
xs = [torch.randn(1, sh.dim, device=dev, dtype=torch.bfloat16) for _ in range(8)]
layers = [layer] + [copy.deepcopy(layer) for _ in range(7)]
floor_ms = None
res = {"machine": mb.machine_info(dev), "base": base, "shapes": {}}
graphs = {}
with torch.no_grad():
    ref = None
    for name, over in SHAPES.items():
        dk.SLOT_TILES.clear(); dk.SLOT_TILES.update(base, **over)
        try:
            y = layer(xs[0]).clone()
            ref = y if ref is None else ref
            one = mb.try_graph(dev, layer, xs)
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for m, x in zip(layers, xs):
                    m(x)
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for m, x in zip(layers, xs):
                    m(x)
            graphs[name] = (one, g)
            res["shapes"][name] = {"tiles": dict(dk.SLOT_TILES), "same_bits_as_default": bool(torch.equal(y, ref)), "one": [], "stack": []}
        except Exception as e:
            res["shapes"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, "ERROR", res["shapes"][name]["error"], flush=True)
    for _ in range(5):
        for name, (one, g) in graphs.items():
            r = res["shapes"][name]
            r["one"].append(mb.timer(dev, one, 200))
            r["stack"].append(mb.timer(dev, lambda i: g.replay(), 100) / len(layers))
dk.SLOT_TILES.clear(); dk.SLOT_TILES.update(base)
# The HBM floor of T=1: the K touched experts' weights at the datasheet bandwidth.
floor_ms = sh.top_k * 3 * sh.dim * sh.hidden * 2 / mb.H200_HBM_BPS * 1e3
res["floor_ms"] = floor_ms
for name, r in res["shapes"].items():
    if "one" in r:
        r["one_ms"], r["stack_ms"] = statistics.median(r["one"]), statistics.median(r["stack"])
        print(f"{name:>22}: one layer {r['one_ms'] * 1e3:.1f} us ({r['one_ms'] / floor_ms:.2f}x floor), per layer of 8 "
              f"{r['stack_ms'] * 1e3:.1f} us ({r['stack_ms'] / floor_ms:.2f}x); same bits {r['same_bits_as_default']}", flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
PY
echo "sweep rc=$?"
