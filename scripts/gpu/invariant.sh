#!/bin/bash
# Issue 16 on one H200: batch-invariant mode's GPU tests, then its cost table (normal vs
# invariant, same process; eager and CUDA-graph forward). Quick by default (< 150 s):
#   run(kind=nvidia-h200, carry=[".whl"], command="bash scripts/gpu/invariant.sh")
# FULL=1: the whole table (T up to 32768, fwd+bwd everywhere, the generic baseline; ~4 min).
# Needs torch + Triton + the carried wheels (spmd_types, jaxtyping, ...; no vLLM/torchtitan;
# tqdm optional). Writes two files:
#   $OUT/invariant_gpu.log   GPU/versions, pytest -k cuda (with the control prints), bench table + progress
#   $OUT/invariant_gpu.json  the cost table (rewritten after every case: a cut-short run keeps its rows)
set -u
source scripts/gpu/common.sh
export CUBLAS_WORKSPACE_CONFIG=:4096:8
LOG="$OUT/invariant_gpu.log"; JSON="$OUT/invariant_gpu.json"
t0=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$LOG" 2>&1
head -2 "$LOG"
if [ "${SWEEP:-0}" = 1 ]; then
  # Router tiles (small: ROUTER=, large past the row switch: ROUTERL=), decode-form expert tiles
  # (DEC= down GEMM, DECUP= up kernel) x up form, at SWEEP_T
  # (fwd, eager + graph), one process each, one JSON. SWEEP_S caps the whole sweep.
  VARIANTS=${SWEEP_VARIANTS:-"UP=fused|UP=fused ROUTERL=64,128,32,8,3|UP=fused ROUTERL=128,128,32,8,3|UP=fused ROUTERL=128,64,32,4,3"}
  IFS='|' read -ra VS <<< "$VARIANTS"
  for v in "${VS[@]}"; do
    [ $((SECONDS - t0)) -gt ${SWEEP_S:-150} ] && break
    up=$(echo "$v" | sed -n 's/.*UP=\([a-z]*\).*/\1/p'); rt=$(echo "$v" | sed -n 's/.*ROUTER=\([0-9,]*\).*/\1/p')
    rl=$(echo "$v" | sed -n 's/.*ROUTERL=\([0-9,]*\).*/\1/p')
    dg=$(echo "$v" | sed -n 's/.*DEC=\([0-9,]*\).*/\1/p'); du=$(echo "$v" | sed -n 's/.*DECUP=\([0-9,]*\).*/\1/p')
    SPMD_MOE_INVARIANT_DECODE_TILES=$dg SPMD_MOE_INVARIANT_DECODE_UP_TILES=$du \
    SPMD_MOE_INVARIANT_UP=${up:-fused} SPMD_MOE_INVARIANT_ROUTER_TILES=$rt SPMD_MOE_INVARIANT_ROUTER_TILES_LARGE=$rl \
      timeout 60 python3 -m spmd_moe.apps.bench.invariant \
      --device cuda --gpu-t ${SWEEP_T:-512,4096,32768} --bwd-max-t 0 --rounds 2 --no-generic --out "$OUT/.v.json" >> "$LOG" 2>&1
    python3 - "$OUT/.v.json" "$v" "$JSON" <<'PY' || echo "variant $v: no result"
import json, os, sys
r = json.load(open(sys.argv[1])); allr = json.load(open(sys.argv[3])) if os.path.exists(sys.argv[3]) else {}
allr[sys.argv[2]] = r; json.dump(allr, open(sys.argv[3], "w"), indent=1)
print(sys.argv[2], [(x["T"], x["ratio"], x.get("graph_ratio")) for x in r["rows"]])
PY
    rm -f "$OUT/.v.json"
  done
  echo "total $((SECONDS - t0)) s"; exit 0
fi
if [ "${FULL:-0}" = 1 ]; then
  TOTAL=420; TESTS_S=120; BENCH_ARGS=(--gpu-t 1,8,64,512,4096,32768)
else
  TOTAL=145; TESTS_S=85; BENCH_ARGS=(--gpu-t 1,8,64,512 --bwd-max-t 512 --rounds 3 --no-generic --profile-t 1,64)
fi
echo "== pytest -k cuda" >> "$LOG"
timeout "$TESTS_S" python3 -m pytest -v -s -p no:cacheprovider tests/test_batch_invariance.py \
  tests/test_batch_invariance_decode.py -k "cuda" >> "$LOG" 2>&1
echo "pytest rc=$? in $((SECONDS - t0)) s"
grep -iE "passed|failed|skipped|control|Error|assert" "$LOG" | tail -14 | cut -c1-300
BENCH_S=$((TOTAL - (SECONDS - t0)))
t1=$SECONDS
echo "== bench (${BENCH_S} s cap)" >> "$LOG"
timeout "$BENCH_S" python3 -m spmd_moe.apps.bench.invariant --device cuda --out "$JSON" "${BENCH_ARGS[@]}" \
  > "$OUT/.bench.md" 2> "$OUT/.bench.err"
rc=$?
cat "$OUT/.bench.md" >> "$LOG"; tail -20 "$OUT/.bench.err" | cut -c1-300 >> "$LOG"; rm -f "$OUT/.bench.md" "$OUT/.bench.err"
echo "bench rc=$rc in $((SECONDS - t1)) s"
python3 - "$JSON" <<'PY' 2>/dev/null || tail -5 "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
for x in r["rows"]:
    g = f"  graph {x.get('graph_normal_ms')} -> {x.get('graph_invariant_ms')} ({x.get('graph_ratio')}x)" if x["pass"] == "fwd" else ""
    print(f"T={x['T']:>5} {x['pass']:7} eager {x['normal_ms']:.3f} -> {x['invariant_ms']:.3f} ms ({x['ratio']}x){g}"
          + (f"  graph error: {x.get('graph_invariant_error') or x.get('graph_normal_error')}" if 'graph_invariant_error' in x or 'graph_normal_error' in x else ""))
for x in r["rows"]:
    for m in ("normal", "invariant"):
        kp = x.get("kernels_" + m)
        if kp:
            print(f"T={x['T']} {m}: {kp['launches']} kernels {kp['total_us']} us/fwd: " + ", ".join(f"{n[:32]} {u}" for n, u in kp["kernels"][:6]))
print("worst eager", r["worst_ratio"], "worst graph fwd", r.get("worst_graph_ratio"), "met" if r["met"] else "NOT met")
PY
echo "total $((SECONDS - t0)) s"
