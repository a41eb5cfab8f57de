#!/bin/sh
# Session 60, issue 15: Ablation-CAM's resident peak and CPU seconds with its probing chunk channels-last (NEW, this
# branch's src) against main's (OLD: `git -C /work/main archive HEAD src | tar -x -C /tmp/old-abprobe60`) and the
# plain loop given bf16 + channels-last by hand (LOOP, imported from OLD's tree), each in a fresh process, the three
# in every round's one heap layout (session 59's harness, benchmarks/perturbation_mem_s59.sh: PYTHONHASHSEED=<seed>,
# setarch -R, the same command line and environment lengths for every case, each tree through a link of the same
# length), their order rotated with the seed. resnet50, 8 images at 224 px, layer1.0.conv1, 64 channels, one thread.
#   OLD=/tmp/old-abprobe60/src [NEW=...] SEEDS="0 1 2 3 4 5" CORES="0 1" [TREES="main new loop"] \
#     sh benchmarks/perturbation_mem_s60.sh > out.jsonl
#   python benchmarks/perturbation_mem_s60_report.py out.jsonl
HERE=$(cd "$(dirname "$0")" && pwd)
OLD=${OLD:-/tmp/old-abprobe60/src}
NEW=${NEW:-$HERE/../src}
PY=${PY:-/work/main/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
CASE=${CASE:-ablationcam}
CORES=${CORES:-0}
TREES=${TREES:-main new loop}  # which of the three, e.g. "main new"
LINKS=$(mktemp -d /tmp/m60XXXXXX)
ln -s "$(cd "$OLD" && pwd)" "$LINKS/o"
ln -s "$(cd "$NEW" && pwd)" "$LINKS/n"
run() {  # seed tree impl label (on core $CORE)
  cfg="{\"model\":\"resnet50\",\"size\":224,\"images\":8,\"layer\":\"layer1.0.conv1\",\"masks\":64,\"threads\":1}"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  m=$(printf '%-16s' "$CASE"); i=$(printf '%-40s' "$3")
  out=$(BENCH_CONFIG=$cfg PYTHONHASHSEED=$1 PYTHONPATH="$LINKS/$2" setarch -R taskset -c "$CORE" "$PY" \
        "$HERE/perturbation_mem_s60.py" "$m" "$i" | tail -n 1)
  echo "{\"seed\": $1, \"case\": \"$CASE\", \"tree\": \"$4\", \"impl\": \"$3\", \"load\": \"$load\", \"result\": $out}"
}
layout() {  # seed: each of $TREES in that layout, their order rotated with the seed
  set -- "$1" $TREES
  seed=$1; shift
  n=$#; k=$((seed % n))
  while [ $k -gt 0 ]; do t=$1; shift; set -- "$@" "$t"; k=$((k - 1)); done
  for t in "$@"; do
    case $t in
      main) run "$seed" o "salience bf16+channels_last" main ;;
      new) run "$seed" n "salience bf16+channels_last" new ;;
      loop) run "$seed" o "loop bf16+channels_last" loop ;;
    esac
  done
}
ncores=$(echo $CORES | wc -w)
slot=0
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
