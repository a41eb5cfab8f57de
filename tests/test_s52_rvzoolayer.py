"""Review of session 52's small-input default layer (``_layer_search._before_reduction``): where the module before
the reduction holds a whole stage (or block) at the last spatial size, that stage is not skipped. The merged rule
took the map before the outermost module around the old pick that begins at its size; where the first stage keeps
the patch embedding's size (no downsample of its own), that was the patch embedding / stem, before all of the
first stage's blocks (timm's EfficientViT-M0, SHViT-S1 and LeViT at 32 px)."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

import salience
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand

logging.getLogger("timm").setLevel(logging.ERROR)


@pytest.mark.parametrize("arch, kw, merged", [
    # patch_embed 2x2, stages.0 2x2 (its blocks), stages.1's downsample 1x1: the merge gave patch_embed
    ("efficientvit_m0", {"img_size": 32}, "patch_embed"),
    ("shvit_s1", {}, "patch_embed"),
    # stem 2x2, stages.0 (attention blocks on 2x2 tokens: the old default, the stage output), stages.1 subsamples
    # to one token: the merge gave stem, before the whole first stage
    ("levit_128s", {"img_size": 32}, "stem"),
])
def test_first_stage_at_the_embeddings_size_is_not_skipped(arch, kw, merged):
    """At 32 px the first stage keeps the embedding's 2x2 map and the next stage reduces it to one cell: the default
    is the first stage's output (``stages.0``: every later layer is computed from it), not ``merged``."""
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=5, **kw).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert default_layer(net, x) == "stages.0"
    said = describe_default_layer(net, x)
    assert said.startswith("stages.0 (") and repr(merged) not in said, said


class _Block(nn.Module):
    """Two convolutions at the same ``h x w`` with a ReLU between (a block, no skip)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class _Net(nn.Module):
    """A patch embedding to 2x2 (16 px); ``stages.0``: two :class:`_Block` at 2x2; ``stages.1``: a downsample
    (expanding 1x1 conv, then a stride-2 conv to 1x1) and a block; a mean, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 8, stride=8)
        down = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3, 2, 1))
        self.stages = nn.Sequential(nn.Sequential(_Block(8), _Block(8)), nn.Sequential(down, _Block(8)))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.patch_embed(x)).mean((2, 3)))


def test_hand_built_first_stage_is_the_default_and_its_cam_is_the_formula():
    """The last 2x2 map is ``stages.1.downsample``'s expansion; ``stages`` begins at 2x2 too, but holds
    ``stages.0`` (two blocks at 2x2) before it: the default is ``stages.0`` (the merge: ``patch_embed``), and
    Grad-CAM there is the paper's formula by hand."""
    torch.manual_seed(4)  # a seed where neither image's map is 0 everywhere after the ReLU at random init
    net, target = _Net().eval(), torch.tensor([0, 2])
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with unchanged(net):
        layer, cam = default_layer(net, x), salience.gradcam(net, x, target)
    assert layer == "stages.0", layer
    assert_each_varies(cam)
    torch.testing.assert_close(cam, gradcam_by_hand(net, x, layer, target), rtol=1e-4, atol=1e-7)
