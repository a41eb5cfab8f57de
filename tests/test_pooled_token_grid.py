"""Tokens on a grid that neither the patch embedding nor a whole stride gives, on a non-square input: a
model that pools its tokens to ``(3, 8)`` on a 32x48 input, 24 tokens, the cells of the ``4x6`` grid that
the 8-pixel patch embedding (or a stride of 8) gives. ``grid=(3, 8)`` was refused (the same cells in another
shape), with no way round; now only a grid with rows and columns swapped (``(6, 4)``) is refused, and
``grid=(3, 8)`` gives Grad-CAM written out by hand on the 3x8 grid."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

from hand_cams import assert_each_varies, gradcam_by_hand, row_major


class Pooled(nn.Module):
    def __init__(self, patch_embedding: bool):
        super().__init__()
        # an 8x8 patch embedding (stride == kernel) or a padded strided stem (no patch embedding): 4x6 at 32x48
        self.stem = (nn.Conv2d(3, 8, 8, 8) if patch_embedding
                     else nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 4, 1)))
        self.pool = nn.AdaptiveAvgPool2d((3, 8))  # the real token grid: 3 rows, 8 columns
        self.mix = nn.Linear(8, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        t = self.pool(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)  # (B, 24, 8), row-major 3x8
        return self.head(torch.relu(self.mix(t)).mean(1))


@pytest.mark.parametrize("patch_embedding", [True, False], ids=["patch-embedding", "strided-stem"])
def test_a_pooled_grid_with_the_cells_of_another_grid_is_taken_when_given(patch_embedding):
    # a different class per image (a target applied to the wrong image fails), each image's map varying: with seed 0
    # only class 1's maps vary (the others' are all 0), so seed 3, classes 0 and 3
    torch.manual_seed(3)
    net = Pooled(patch_embedding).eval()
    x, target = torch.rand(2, 3, 32, 48), torch.tensor([0, 3])
    cam = salience.gradcam(net, x, target, layer="mix", grid=(3, 8))
    ref = gradcam_by_hand(net, x, "mix", target, row_major(3, 8))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    # rows and columns swapped is still refused (it would scramble the map), naming the grid that fits
    with pytest.raises(SalienceError, match=r"grid=\(4, 6\)"):
        salience.gradcam(net, x, target, layer="mix", grid=(6, 4))


@pytest.mark.parametrize("patch_embedding", [True, False], ids=["patch-embedding", "strided-stem"])
def test_the_default_layer_is_not_tokens_read_on_a_grid_their_map_did_not_have(patch_embedding):
    """The default was ``mix``, its 24 tokens read as the 4x6 grid (what the embedding / a stride gives) though
    they are the 3x8 pooled map flattened: a scrambled map, said nowhere. Tokens whose number of cells the last
    convolution's or pooling's map had in another shape are no candidate now; the default is the stem's 4x6
    map, and Grad-CAM there equals the hand computation."""
    from salience.methods.gradcam import default_layer

    torch.manual_seed(3)  # a seed where both images' maps at the stem vary (seed 0's strided stem: all zero)
    net = Pooled(patch_embedding).eval()
    x, target = torch.rand(2, 3, 32, 48), torch.tensor([0, 3])
    assert default_layer(net, x) == "stem"
    ref = gradcam_by_hand(net, x, "stem", target)
    assert (ref.flatten(1).std(1) > 0).all()
    torch.testing.assert_close(salience.gradcam(net, x, target), ref, rtol=1e-4, atol=1e-6)
