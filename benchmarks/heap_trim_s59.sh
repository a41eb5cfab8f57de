#!/bin/sh
# Session 59, issue 15 memory: a bf16 call's resident peak (benchmarks/heap_trim_s59.py) with malloc_trim(0) at each
# TRIM variant's points, every variant in each round's one heap layout (PYTHONHASHSEED=<seed>, setarch -R, the same
# command line and environment lengths: session 57's runner). resnet50, 8 images at 224 px, layer1.0.conv1, 64 masks
# / channels, one thread a process, salience as IMPL (default "salience bf16+channels_last"), main's src as TREE.
#   TREE=/tmp/old-bfmem59/src CASES="ablationcam scorecam rise64" CORES="0 1" sh benchmarks/heap_trim_s59.sh > out.jsonl
# VARIANTS (default "none cache cache,clear"), SEEDS (default "0 1 2"), CORES (default "0").
HERE=$(cd "$(dirname "$0")" && pwd)
TREE=${TREE:-$HERE/../src}
PY=${PY:-/work/main/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
CASES=${CASES:-ablationcam}
IMPL=${IMPL:-salience bf16+channels_last}
VARIANTS=${VARIANTS:-none cache cache,clear}
CORES=${CORES:-0}
LINKS=$(mktemp -d /tmp/t59XXXXXX)
ln -s "$(cd "$TREE" && pwd)" "$LINKS/t"
run() {  # seed case variant (on core $CORE)
  case $2 in
    rise64) method=rise; masks=64 ;;
    *) method=$2; masks=64 ;;
  esac
  cfg="{\"model\":\"resnet50\",\"size\":224,\"images\":8,\"layer\":\"layer1.0.conv1\",\"masks\":$masks,\"threads\":1}"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  m=$(printf '%-16s' "$method"); i=$(printf '%-40s' "$IMPL"); v=$(printf '%-24s' "$3")
  out=$(TRIM_AT="$v" BENCH_CONFIG=$cfg PYTHONHASHSEED=$1 PYTHONPATH="$LINKS/t" setarch -R taskset -c "$CORE" "$PY" \
        "$HERE/heap_trim_s59.py" "$m" "$i" | tail -n 1)
  echo "{\"seed\": $1, \"case\": \"$2\", \"variant\": \"$3\", \"load\": \"$load\", \"result\": $out}"
}
layout() {  # seed: every case and variant in that layout, the variants' order rotated with the seed
  for c in $CASES; do
    set -- $VARIANTS
    n=$#
    r=0; while [ $r -lt $(( seed_of_layout % n )) ]; do v=$1; shift; set -- "$@" "$v"; r=$((r + 1)); done
    for v in "$@"; do run "$seed_of_layout" "$c" "$v"; done
  done
}
ncores=$(echo $CORES | wc -w)
slot=0
for CORE in $CORES; do
  (nth=0; for seed_of_layout in $SEEDS; do
     if [ $((nth % ncores)) -eq $slot ]; then layout > "$LINKS/out.$seed_of_layout"; fi
     nth=$((nth + 1))
   done) &
  slot=$((slot + 1))
done
wait
for s in $SEEDS; do cat "$LINKS/out.$s"; done
rm -rf "$LINKS"
