#!/bin/bash
# Session 47: live tensors at the peak (benchmarks/perturbation_tensor_peak_s45.py, MemoryProbe, bytes), resnet50, 8
# images at 224 px, 3 chunks, salience (the tree TREE, default: here) and the plain loop; fp32 RISE and Ablation-CAM
# 5 rounds (deterministic: the same bytes each), the others once. One JSON line per run:
#   TREE=$PWD benchmarks/perturbation_tensor_peak_s47.sh > benchmarks/perturbation-resnet50-8images-s47-mem.jsonl
cd "${TREE:-$PWD}"
run() { BYTES=1 MIN_KIB=0 LOOP=1 M=resnet50 S=224 B=8 CHUNKS=3 PYTHONPATH="${TREE:-$PWD}"/src taskset -c 0 ${PYTHON:-/work/main/.venv/bin/python} benchmarks/perturbation_tensor_peak_s45.py "$@"; }
BF='dict(precision="bf16", memory_format="channels_last", fold_batchnorm=True)'
for r in 1 2 3 4 5; do
  run rise "dict(masks=3)" "dict()"
  run ablationcam "dict(layer='layer1.0.conv1')" "dict()"
done
run scorecam "dict(layer='layer1.0.conv1')" "dict()"
run rise "dict(masks=3)" "$BF"
run scorecam "dict(layer='layer1.0.conv1')" "$BF"
run ablationcam "dict(layer='layer1.0.conv1')" 'dict(precision="bf16", memory_format="channels_last")'
