#!/bin/bash
# Session 47 (task "split"): Ablation-CAM fp32 live-tensor peaks (bytes), resnet50, 8 images at 224 px, 3 chunks, the
# clean pass as two (SPLIT=1), as one (SPLIT=0) and the code's choice (SPLIT=auto), at four layers. One JSON line a run:
#   benchmarks/split_peak_s47.sh > benchmarks/ablationcam-split-s47-mem.jsonl
cd "${TREE:-$PWD}"
for layer in layer1.0.conv1 layer2.0.conv1 layer3.5.conv3 layer4; do
  for s in ${SPLITS:-1 0 auto}; do
    echo -n "{\"layer\": \"$layer\", \"split\": \"$s\", \"run\": "
    SPLIT=$s BYTES=1 MIN_KIB=262144 M=resnet50 S=224 B=8 CHUNKS=3 PYTHONPATH="$PWD"/src taskset -c 0 \
      ${PYTHON:-/work/main/.venv/bin/python} benchmarks/split_peak_s47.py "dict(layer='$layer')" | tr -d '\n'
    echo "}"
  done
done
