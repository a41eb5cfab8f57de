"""Session 47 (task "split"): Ablation-CAM's live-tensor peak with its float32 clean pass as two (the split,
scorecam._clean_apart) and as one (scorecam._capture's pass), per layer: benchmarks/perturbation_tensor_peak_s45.py
run with the clean pass forced (SPLIT=1: the split; SPLIT=0: the one pass; unset: the code's own choice).

    SPLIT=1 BYTES=1 MIN_KIB=0 M=resnet50 S=224 B=8 CHUNKS=3 PYTHONPATH=src taskset -c 0 python \
        benchmarks/split_peak_s47.py "dict(layer='layer1.0.conv1')"
"""
import os
import runpy
import sys

import importlib

scorecam = importlib.import_module("salience.methods.scorecam")

split = os.environ.get("SPLIT")
if split == "0":
    scorecam._clean_apart = lambda model, x, mod, strip: scorecam._capture(model, x, mod, strip, x.shape[0])
elif split == "1" and hasattr(scorecam, "_split_pays"):
    scorecam._split_pays = lambda *a, **k: True
here = os.path.dirname(os.path.abspath(__file__))
sys.argv = [os.path.join(here, "perturbation_tensor_peak_s45.py"), "ablationcam", sys.argv[1], "dict()"]
runpy.run_path(sys.argv[0], run_name="__main__")
