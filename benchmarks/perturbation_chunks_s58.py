"""The chunks salience runs for Score-CAM, Ablation-CAM and RISE under bf16 + channels-last (issue 15 on equal terms):
counts, which the machine's load does not change. Prints the memory probe's bytes per item and every chunk's size.

    PYTHONPATH=src python benchmarks/perturbation_chunks_s58.py rise 4      # RISE with 4 masks, 8 images at 224 px
    PYTHONPATH=src python benchmarks/perturbation_chunks_s58.py scorecam    # 64 channels of layer1.0.conv1
    FOLD=1 PYTHONPATH=src python benchmarks/perturbation_chunks_s58.py rise 4

The configuration of benchmarks/perturbation-resnet50-8images-bf16-amx-s58.md (torchvision resnet50, random weights,
8 images of 224 x 224, one thread).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torchvision

import salience
from salience._core import engine


def main() -> None:
    method = sys.argv[1]
    masks = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    accumulate = engine._accumulate

    def spy(*args, **kwargs):
        sums = accumulate(*args, **kwargs)
        print(f"{method}: probe {sums.per_item_bytes} bytes an item; {len(sums.chunks)} chunks: {sums.chunks}")
        return sums

    engine._accumulate = spy
    opts = {"rise": dict(masks=masks)}.get(method, dict(layer="layer1.0.conv1"))
    with salience.performance(precision="bf16", memory_format="channels_last",
                              fold_batchnorm=bool(int(os.environ.get("FOLD", "0")))):
        getattr(salience, method)(model, x, target, **opts)


if __name__ == "__main__":
    main()
