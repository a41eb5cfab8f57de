#!/bin/sh
# Session 57, issue 15 memory: Ablation-CAM's call resident peak, salience (two source trees: OLD, main's code, and
# NEW, this branch's) against the plain loop, each in every round's one heap layout: session 56's script
# (benchmarks/perturbation_mem_s56.sh: PYTHONHASHSEED=<seed>, setarch -R, the same command line and environment
# lengths for every case, each tree on PYTHONPATH through a link of the same length) with session 57's measure
# (benchmarks/perturbation_mem_s57.py: session 55's, with the setup's pass of the 8 images on the call's one thread;
# session 55's ran it on torch's default threads). resnet50, 8 images at 224 px, fp32, one thread a process.
#   OLD=/tmp/old57/src NEW=./src sh benchmarks/perturbation_mem_s57.sh > out.jsonl
#   python benchmarks/perturbation_mem_s56_report.py out.jsonl
# SEEDS (default "0 1 2"), CASES (default "ablationcam"). CORES (default "0"): the cores the layouts run on, one
# process a core at a time, the seeds dealt to them in turn (CORES="0 1": two layouts at once; a layout's peak did not
# move with the load: the same code and layout gave the same peak within 0.1 MiB at loads of 1.5 to 10, the s57
# table's note). One JSON line a measurement, with the load, in the order of the seeds.
HERE=$(cd "$(dirname "$0")" && pwd)
OLD=${OLD:-/tmp/old57/src}
NEW=${NEW:-$HERE/../src}
PY=${PY:-/work/main/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
CASES=${CASES:-ablationcam}
CORES=${CORES:-0}
LINKS=$(mktemp -d /tmp/m57XXXXXX)
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
    # the order rotated with the seed: salience OLD, NEW and the loop each first in one round
    case $((seed % 3)) in
      0) run "$seed" "$c" o salience; run "$seed" "$c" n salience; run "$seed" "$c" n loop ;;
      1) run "$seed" "$c" n salience; run "$seed" "$c" n loop; run "$seed" "$c" o salience ;;
      *) run "$seed" "$c" n loop; run "$seed" "$c" o salience; run "$seed" "$c" n salience ;;
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
