"""How many (channel, photo) items of a CAM layer Score-CAM and Ablation-CAM run no pass for (no timing).

    python benchmarks/cam_skip_count.py --photos chelsea,coffee,rocket,astronaut

Pretrained EfficientNet-Lite0 (examples/explain_real_photos.py) at 224 x 224, its default CAM layer ``head_act``;
and torchvision's resnet50 with random weights (seed 0, the issue's benchmark model) on 2 random images (seed 1)
at ``layer4`` and ``layer4.0.conv1``. Per photo: channels all zero, channels constant (Score-CAM's empty mask),
live ones, and the distinct masks among them (Score-CAM's passes). Not part of salience nor of the tests.
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import torch

from salience.methods.scorecam import _ChannelMasks

ROOT = Path(__file__).resolve().parent.parent


def _rows(name, model, layer, x, labels):
    store = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.append(o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    acts = store[0]
    out = []
    for b, label in enumerate(labels):
        a = acts[b:b + 1]
        masks = _ChannelMasks(x[b:b + 1], a, False)
        live = masks.live()
        first, _ = masks.distinct(live)
        flat = a.flatten(2)[0]
        out.append(f"| {name} | {layer} {tuple(acts.shape[1:])} | {label} | {int((flat == 0).all(1).sum())} | "
                   f"{int((flat.amax(1) == flat.amin(1)).sum())} | {len(live)} | {len(first)} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--photos", default="chelsea,coffee,rocket,astronaut")
    a = p.parse_args()
    torch.set_num_threads(1)
    lite = runpy.run_path(str(ROOT / "examples" / "explain_real_photos.py"))
    names = a.photos.split(",")
    lines = ["| model | layer (channels, h, w) | image | all zero | constant (no Score-CAM pass) | live | "
             "distinct masks (Score-CAM's passes) |", "|---|---|---|---|---|---|---|"]
    lines += _rows("EfficientNet-Lite0, pretrained", lite["load_lite0"](), "head_act", lite["load_photos"](names), names)
    import torchvision

    torch.manual_seed(0)
    r50 = torchvision.models.resnet50().eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    for layer in ("layer4", "layer4.0.conv1"):
        lines += _rows("resnet50, random weights", r50, layer, x, ["random 0", "random 1"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
