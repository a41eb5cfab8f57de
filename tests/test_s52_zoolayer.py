"""The default Grad-CAM layer on inputs so small that the last maps have one cell (session 52): not a layer inside
the module that reduces the last spatial map to one cell (a branch of an Inception block, the expansion of a stage's
downsample), but the block or stage output that module is computed from, as at the models' native sizes."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand

logging.getLogger("timm").setLevel(logging.ERROR)


def _timm(arch: str, size: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=5, **kw).eval()


@pytest.mark.parametrize("arch, size, kw, layer, inside", [
    # 32 px: stages.2 2x2, stages.3 1x1; the LayerNorm of stages.3's downsample (norm, stride-2 conv) was the default
    ("convnext_atto", 32, {}, "stages.2", "stages.3"),
    # 96 px: Mixed_6e 4x4, Mixed_7a's stride-2 branches give 1x1; its 7x7x3 branch's third conv was the default
    ("inception_v3", 96, {}, "Mixed_6e", "Mixed_7a"),
    # 64 px: stages.1 2x2, stages.2's downsample 1x1; its patch merging's 1x1 expansion conv was the default
    ("efficientvit_m0", 64, {"img_size": 64}, "stages.1", "stages.2"),
    # 64 px: stages.1 2x2, stages.2 1x1; the activation inside its downsample's last block was the default
    ("shvit_s1", 64, {}, "stages.1", "stages.2"),
])
def test_small_input_default_is_the_block_before_the_reduction(arch, size, kw, layer, inside):
    """The last map with h * w > 1 was inside the module that reduces it to one cell (old defaults:
    ``Mixed_7a.branch7x7x3_3``, ``stages.2.downsample.patchmerge.conv1``, ``stages.2.downsample.2.act1``); the
    default is now the block / stage output that module is computed from, and its description names that module."""
    net = _timm(arch, size, **kw)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert default_layer(net, x) == layer
    said = describe_default_layer(net, x)
    assert said.startswith(layer + " (") and repr(inside) in said, said


def test_native_size_defaults_stay():
    """At their native sizes the last maps are spatial: the defaults are the last block / stage output, as before."""
    net = _timm("efficientvit_m0", 224)
    assert default_layer(net, torch.rand(1, 3, 224, 224)) == "stages"
    net = _timm("shvit_s1", 224)
    assert default_layer(net, torch.rand(1, 3, 224, 224)) == "stages"


class _Mixed(nn.Module):
    """An Inception-like reduction block: three branches, concatenated; each halves ``h x w`` (2x2 -> 1x1)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch_a = nn.Conv2d(c, 4, 3, stride=2, padding=1)
        self.branch_b1 = nn.Conv2d(c, 4, 1)  # 2x2: the last map with h * w > 1, in a branch
        self.branch_b2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 2)
        return torch.cat([self.branch_a(x), self.branch_b2(F.relu(self.branch_b1(x))), pooled], 1)


class _BranchNet(nn.Module):
    """stem (8 -> 2x2 on 16 px), a block at 2x2, a :class:`_Mixed` to 1x1, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 8, stride=8)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.mixed = _Mixed(6)
        self.head = nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixed(self.block(self.stem(x))).flatten(1))


class _Stage(nn.Module):
    """A downsample that expands (1x1 conv), then halves ``h x w``; a block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.ReLU(), nn.Conv2d(2 * c, c, 3, 2, 1))
        self.blocks = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class _StageNet(nn.Module):
    """A patch embedding to 4x4 (16 px), ``stages`` of two :class:`_Stage` (4x4 -> 2x2 -> 1x1), a mean, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 4, stride=4)
        self.stages = nn.Sequential(_Stage(4), _Stage(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.patch_embed(x)).mean((2, 3)))


def test_branch_joined_by_a_concat_loses_to_the_block_it_reads():
    """The last 2x2 map, ``mixed.branch_b1``, is one branch of three that the concatenation joins: Grad-CAM there
    sees one branch. The default is ``block``, which every branch reads; Grad-CAM there is the paper's formula."""
    torch.manual_seed(0)
    net = _BranchNet().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert default_layer(net, x) == "block"
    target = torch.tensor([0, 2])
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    assert_each_varies(cam)
    torch.testing.assert_close(cam, gradcam_by_hand(net, x, "block", target), rtol=1e-4, atol=1e-7)


def test_downsample_to_one_cell_loses_to_the_stage_before_it():
    """The last 2x2 map is the ReLU after the expansion inside ``stages.1``'s downsample (the old default,
    ``stages.1.downsample.1``). ``stages`` begins at 4x4 (the patch embedding's map), so it is looked into:
    ``stages.1`` begins at 2x2 and reduces it to one cell; the default is ``stages.0``, the map it is computed from."""
    torch.manual_seed(0)
    net = _StageNet().eval()
    assert default_layer(net, torch.rand(1, 3, 16, 16)) == "stages.0"


def test_a_map_that_later_computation_bypasses_is_not_taken():
    """Where the head also reads the patch embedding (a skip around ``stages``), ``stages.0`` is not what all later
    computation comes from: the rule finds no such map and keeps the last map with h * w > 1."""
    torch.manual_seed(0)
    net = _StageNet().eval()
    forward = net.forward
    net.forward = lambda x: forward(x) + net.head(net.patch_embed(x).mean((2, 3)))
    assert default_layer(net, torch.rand(1, 3, 16, 16)) == "stages.1.downsample.1"


def test_a_residual_block_before_the_reduction_stays():
    """Hugging Face LeViT ends each stage with its subsampling: at 64 px ``levit.encoder.stages.1`` runs an attention
    and an MLP block at 2x2, then subsamples to one token. Its last 2x2 map, ``stages.1.layers.1``, is a residual
    block's output (``x + mlp(x)``): the main path at that size, not a step of the reduction; it stays the default
    (the rule without this check moved it back to ``stages.0``, before stage 1's blocks)."""
    from transformers import LevitConfig, LevitForImageClassification
    torch.manual_seed(0)
    config = LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                         key_dim=[8, 8, 8], num_labels=3)
    net = LevitForImageClassification(config).eval()
    assert default_layer(net, torch.rand(1, 3, 64, 64)) == "levit.encoder.stages.1.layers.1"
