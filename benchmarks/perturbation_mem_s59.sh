#!/bin/sh
# Session 59, issue 15 memory under bf16: each perturbation call's resident peak with the bf16 weight copies in one
# mapped block (NEW, this branch's src) against main's (OLD: `git -C /work/main archive HEAD src | tar -x -C
# /tmp/old-bfmem59`), salience as IMPL (default "salience bf16+channels_last": precision="bf16",
# memory_format="channels_last"), in every round's one heap layout: session 57's script
# (benchmarks/perturbation_mem_s57.sh: PYTHONHASHSEED=<seed>, setarch -R, the same command line and environment
# lengths for every case, each tree on PYTHONPATH through a link of the same length) and measure
# (benchmarks/perturbation_mem_s57.py: VmHWM above the RSS before the call, the setup's freed heap trimmed first).
# resnet50, 8 images at 224 px, layer1.0.conv1, 64 masks / channels, one thread a process.
#   OLD=/tmp/old-bfmem59/src NEW=./src CASES="ablationcam scorecam rise64" sh benchmarks/perturbation_mem_s59.sh > out.jsonl
#   python benchmarks/perturbation_mem_s59_report.py out.jsonl
# SEEDS (default "0 1 2"), CASES (default "ablationcam"), CORES (default "0"; "0 1": two layouts at once, a layout's
# peak does not move with the load: the s57 table's note). One JSON line a measurement, with the load.
HERE=$(cd "$(dirname "$0")" && pwd)
OLD=${OLD:-/tmp/old-bfmem59/src}
NEW=${NEW:-$HERE/../src}
PY=${PY:-/work/main/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
CASES=${CASES:-ablationcam}
IMPL=${IMPL:-salience bf16+channels_last}
CORES=${CORES:-0}
LINKS=$(mktemp -d /tmp/m59XXXXXX)
ln -s "$(cd "$OLD" && pwd)" "$LINKS/o"
ln -s "$(cd "$NEW" && pwd)" "$LINKS/n"
run() {  # seed case tree impl (on core $CORE)
  case $2 in
    rise8) method=rise; masks=8 ;;
    rise64) method=rise; masks=64 ;;
    *) method=$2; masks=64 ;;
  esac
  cfg="{\"model\":\"resnet50\",\"size\":224,\"images\":8,\"layer\":\"layer1.0.conv1\",\"masks\":$masks,\"threads\":1}"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  m=$(printf '%-16s' "$method"); i=$(printf '%-40s' "$4")
  out=$(BENCH_CONFIG=$cfg PYTHONHASHSEED=$1 PYTHONPATH="$LINKS/$3" setarch -R taskset -c "$CORE" "$PY" \
        "$HERE/perturbation_mem_s57.py" "$m" "$i" | tail -n 1)
  echo "{\"seed\": $1, \"case\": \"$2\", \"tree\": \"$3\", \"impl\": \"$4\", \"load\": \"$load\", \"result\": $out}"
}
layout() {  # seed: every case in that layout
  seed=$1
  for c in $CASES; do
    # the order alternated with the seed: OLD first in even rounds, NEW in odd ones
    case $((seed % 2)) in
      0) run "$seed" "$c" o "$IMPL"; run "$seed" "$c" n "$IMPL" ;;
      *) run "$seed" "$c" n "$IMPL"; run "$seed" "$c" o "$IMPL" ;;
    esac
  done
}
ncores=$(echo $CORES | wc -w)
slot=0  # (run() sets i and m: these names are the dealing's own)
for CORE in $CORES; do
  (nth=0; for seed in $SEEDS; do
     if [ $((nth % ncores)) -eq $slot ]; then layout "$seed" > "$LINKS/out.$seed"; fi
     nth=$((nth + 1))
   done) &
  slot=$((slot + 1))
done
wait
for seed in $SEEDS; do cat "$LINKS/out.$seed"; done
rm -rf "$LINKS"
