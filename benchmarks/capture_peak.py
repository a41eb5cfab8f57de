"""Peak CPU memory of one Grad-CAM call (the PyTorch profiler's memory timeline, every category summed): a random
torchvision resnet18, 8 images at 224, one thread, the layer given (``layer1``: early, a large activation;
``layer4``: the default). Run it with the salience to measure on PYTHONPATH:

    PYTHONPATH=src taskset -c 1 python benchmarks/capture_peak.py layer1

Session 42's capture copies the layer's output when the layer returns and drops the copy after the pass where nothing
changed it in place; the copy lives through the rest of the forward, so at an early layer it is at the pass's peak
(benchmarks/capture-peak-s42.md)."""
from __future__ import annotations

import json
import sys
import tempfile

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import salience


def peak_mib(layer_name: str) -> float:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(8, 3, 224, 224)
    layer = model.get_submodule(layer_name)
    salience.gradcam(model, x, 1, layer=layer)  # warm
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        salience.gradcam(model, x, 1, layer=layer)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_memory_timeline(f.name, device="cpu")
        _, sizes = json.load(open(f.name))
    return max(sum(s) for s in sizes) / 2**20


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"{sys.argv[1]} peak {peak_mib(sys.argv[1]):.2f} MiB")
