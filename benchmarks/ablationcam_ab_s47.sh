#!/bin/bash
# Session 47: Ablation-CAM fp32 (resnet50, 8 images at 224 px, layer1.0.conv1), trees interleaved, the order rotated
# each round, one fresh process each, on core 1 (run it under the lock):
#   TREES="old=/tmp/old-permem main=/tmp/main-permem new=$PWD" ROUNDS=3 LOOP=1 \
#       flock /tmp/bench.lock bash benchmarks/ablationcam_ab_s47.sh > benchmarks/ablationcam-ab-s47-run1.txt
# each tree a directory with src/ (old: `git archive 9fa9005 src`); LOOP=1 adds the plain fp32 loop
# (benchmarks/perturbation.py --one ablationcam loop). One line "round R NAME <loadavg>", then the run's JSON line.
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-/work/main/.venv/bin/python}
cfg='{"model": "resnet50", "size": 224, "images": 8, "layer": "layer1.0.conv1", "threads": 1}'
read -r -a names <<< "$TREES"
[ -n "$LOOP" ] && names+=(loop)
n=${#names[@]}
for ((r = 0; r < ${ROUNDS:-3}; r++)); do
  for ((i = 0; i < n; i++)); do
    v=${names[$(( (i + r) % n ))]}
    echo "round $r ${v%%=*} $(cat /proc/loadavg)"
    if [ "$v" = loop ]; then
      BENCH_CONFIG="$cfg" PYTHONPATH="$here/../src" taskset -c 1 "$py" "$here/perturbation.py" --one ablationcam loop | tail -1
    else
      PYTHONPATH="${v#*=}/src" taskset -c 1 "$py" "$here/ablationcam_faults_s47.py" ablationcam layer1.0.conv1 8
    fi
  done
done
