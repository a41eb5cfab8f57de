#!/bin/sh
# Session 55, issue 15 memory: peak resident memory of RISE, Ablation-CAM and Score-CAM (fp32 defaults) against the
# plain loop, resnet50, 8 images at 224 px, the CAMs' layer1.0.conv1, RISE MASKS masks (default 64, session 44's /
# 49's configuration), one thread; core 0 (memory only: no lock). Each measurement a fresh process
# (benchmarks/perturbation_mem_s55.py): the setup's freed heap given back (malloc_trim) and the high-water mark reset
# before the call, so the figure is the call's own growth above the live memory before it. Each round is one heap
# layout: PYTHONHASHSEED=<round's seed> and no address randomization (setarch -R), the same for every case of the
# round; without them the same pass's peak moves by 30 MiB from process to process (session 55). SEEDS: the rounds'
# seeds (default "0 1 2"), the order of the cases rotated each round. SRC: the source tree measured (default ./src).
# One JSON line a measurement, with the load average before it.
#   SRC=<tree>/src sh benchmarks/perturbation_mem_s55.sh [CASE ...] > out.jsonl
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${SRC:-$HERE/../src}
PY=${PY:-/work/main/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
MASKS=${MASKS:-64}
export BENCH_CONFIG="{\"model\":\"resnet50\",\"size\":224,\"images\":8,\"layer\":\"layer1.0.conv1\",\"masks\":$MASKS,\"threads\":1}"
if [ $# -eq 0 ]; then
  set -- "rise salience" "rise loop" "ablationcam salience" "ablationcam loop" "scorecam salience" "scorecam loop"
fi
for seed in $SEEDS; do
  for case in "$@"; do
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    # the method and implementation padded to fixed widths: the layout follows the length of the command line (the
    # stack's size moves the heap), so unpadded "salience" and "loop" ran in two different layouts (review s55)
    method=$(printf '%-16s' "${case%% *}"); impl=$(printf '%-40s' "${case#* }")
    out=$(PYTHONHASHSEED=$seed PYTHONPATH="$SRC" setarch -R taskset -c 0 "$PY" "$HERE/perturbation_mem_s55.py" \
          "$method" "$impl" | tail -n 1)
    echo "{\"seed\": $seed, \"masks\": $MASKS, \"case\": \"$case\", \"src\": \"$SRC\", \"load\": \"$load\", \"result\": $out}"
  done
  first=$1; shift; set -- "$@" "$first"  # rotate the order
done
