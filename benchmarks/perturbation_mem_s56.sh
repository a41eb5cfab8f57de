#!/bin/sh
# Session 56, issue 15 memory: the call's resident peak of salience (two source trees: OLD, the code before, and NEW)
# against the plain loop, each case in every round's one heap layout (benchmarks/perturbation_mem_s55.py's measure,
# a fresh process each: the heap trimmed and the high-water mark reset before the call). resnet50, 8 images at
# 224 px, fp32, one thread, core 0 (memory: not under the lock). Cases: RISE at 8 and 64 masks, Ablation-CAM at
# layer1.0.conv1 (salience OLD, salience NEW, the loop each).
#
# One layout a round: PYTHONHASHSEED=<seed>, no address randomization (setarch -R), and the same command line and
# environment lengths for every case (the stack's size moves the heap, review s55): the method and implementation
# padded (as the s55 script), and the source tree given through a link of the same length for OLD and NEW
# ($LINKS/o and $LINKS/n; before, SRC itself was in PYTHONPATH, and two trees of other path lengths ran in two
# layouts). The loop runs with NEW's tree on its path (it imports only rise_masks: the same code in both).
#   OLD=/tmp/old-mem/src NEW=./src sh benchmarks/perturbation_mem_s56.sh > out.jsonl
# SEEDS (default "0 1 2"), CASES (default "rise8 rise64 ablationcam"). One JSON line a measurement, with the load.
HERE=$(cd "$(dirname "$0")" && pwd)
OLD=${OLD:-/tmp/old-mem/src}
NEW=${NEW:-$HERE/../src}
PY=${PY:-/work/main/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
CASES=${CASES:-rise8 rise64 ablationcam}
LINKS=$(mktemp -d /tmp/m56XXXXXX)
ln -s "$(cd "$OLD" && pwd)" "$LINKS/o"
ln -s "$(cd "$NEW" && pwd)" "$LINKS/n"
run() {  # seed case tree impl
  case $2 in
    rise8) method=rise; masks=8 ;;
    rise64) method=rise; masks=64 ;;
    *) method=$2; masks=64 ;;
  esac
  cfg="{\"model\":\"resnet50\",\"size\":224,\"images\":8,\"layer\":\"layer1.0.conv1\",\"masks\":$masks,\"threads\":1}"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  m=$(printf '%-16s' "$method"); i=$(printf '%-40s' "$4")
  out=$(BENCH_CONFIG=$cfg PYTHONHASHSEED=$1 PYTHONPATH="$LINKS/$3" setarch -R taskset -c 0 "$PY" \
        "$HERE/perturbation_mem_s55.py" "$m" "$i" | tail -n 1)
  echo "{\"seed\": $1, \"case\": \"$2\", \"tree\": \"$3\", \"impl\": \"$4\", \"load\": \"$load\", \"result\": $out}"
}
for seed in $SEEDS; do
  for c in $CASES; do
    # the order rotated with the seed: salience OLD, NEW and the loop each first in one round
    case $((seed % 3)) in
      0) run "$seed" "$c" o salience; run "$seed" "$c" n salience; run "$seed" "$c" n loop ;;
      1) run "$seed" "$c" n salience; run "$seed" "$c" n loop; run "$seed" "$c" o salience ;;
      *) run "$seed" "$c" n loop; run "$seed" "$c" o salience; run "$seed" "$c" n salience ;;
    esac
  done
done
rm -rf "$LINKS"
