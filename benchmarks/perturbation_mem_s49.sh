#!/bin/sh
# Session 49, issue 15 memory: peak resident memory (VmHWM above the RSS before the call, a fresh process per
# measurement: benchmarks/perturbation.py --one) of RISE and Ablation-CAM in fp32 (defaults) against the plain loop,
# resnet50, 8 images at 224 px, Score-CAM's / Ablation-CAM's layer1.0.conv1, RISE 64 masks (session 44's
# configuration), one thread; ROUNDS interleaved rounds (default 3), the order rotated each round; core 0 (memory
# only: no lock). One JSON line a measurement, with the load average before it.
#   TREE=<source tree> sh benchmarks/perturbation_mem_s49.sh > benchmarks/perturbation-resnet50-8images-s49-mem.jsonl
TREE=${TREE:-$PWD}
PY=${PY:-/work/main/.venv/bin/python}
ROUNDS=${ROUNDS:-3}
export BENCH_CONFIG='{"model":"resnet50","size":224,"images":8,"layer":"layer1.0.conv1","masks":64,"threads":1}'
set -- "rise salience" "rise loop" "ablationcam salience" "ablationcam loop"
r=1
while [ "$r" -le "$ROUNDS" ]; do
  for case in "$@"; do
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    out=$(PYTHONPATH="$TREE/src" taskset -c 0 "$PY" "$TREE/benchmarks/perturbation.py" --one $case | tail -n 1)
    echo "{\"round\": $r, \"case\": \"$case\", \"load\": \"$load\", \"result\": $out}"
  done
  first=$1; shift; set -- "$@" "$first"  # rotate the order
  r=$((r + 1))
done
