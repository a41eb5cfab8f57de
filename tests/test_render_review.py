"""A review of the render audit (merge 5cc9428): each test here failed before its fix. The audit's
new aspect-ratio check refused the maps of unpadded ("valid") convolutions on non-square images,
which lose the same border on both axes (a Keras tutorial's CNN: 52 x 28 on 224 x 128);
``save_png`` wrote PNG bytes under a ``.jpg`` name; ``figure`` had no size cap and drew a title
``None`` as "None" and a string's letters as titles; ``line_plot`` took any number of xticks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.render import viz

RNG = np.random.default_rng(0)


def _valid_cnn() -> nn.Module:
    """Keras's default ``padding="valid"``: conv 3x3, pool 2, conv 3x3, pool 2, conv 3x3, then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("image_hw, map_hw", [((224, 128), (52, 28)), ((64, 128), (12, 28)), ((100, 37), (21, 5)),
                                              ((100, 300), (1, 8)), ((48, 37), (36, 25)), ((32, 48), (20, 36))],
                         ids=["keras-tutorial", "wide", "tall", "inception-v3", "valid-5x5-x3", "valid-small"])
def test_a_valid_convolution_map_fits_its_image(image_hw, map_hw):
    """Unpadded convolutions lose a border r on both axes, ``h = (H - r) / s``: the map is this image's
    (``gradcam``'s own upsampling stretches it so), and was refused as of another aspect ratio
    (inception-v3: Mixed_7c's 1 x 8 on 100 x 300; three valid 5x5 convolutions: 36 x 25 on 48 x 37).
    Its transpose stays refused."""
    img = np.full((*image_hw, 3), 90, np.uint8)
    m = RNG.random(map_hw)
    assert viz.overlay(img, m).shape == (*image_hw, 3)
    assert viz.figure(img, {"cam": m[None]}, labels=False).shape[:2] == (image_hw[0] + 8, 3 * image_hw[1] + 16)
    with pytest.raises(SalienceError, match="does not fit the image"):
        viz.overlay(img, m.T)


def test_gradcam_at_a_valid_layer_overlays_like_its_upsampled_map():
    """``gradcam(upsample=False)`` of a valid-conv CNN on a 100 x 37 image is 21 x 5; its overlay is the
    overlay of the map ``gradcam`` upsamples itself (both bilinear to the image), not a refusal."""
    model, x = _valid_cnn(), torch.rand(1, 3, 100, 37, generator=torch.Generator().manual_seed(1))
    small = salience.gradcam(model, x, 0, upsample=False, relu=False)
    assert small.shape == (1, 21, 5)
    img = viz.to_uint8_image(x[0])
    got = viz.overlay(img, small[0], norm="minmax")
    assert got.shape == (100, 37, 3)
    assert np.abs(got.astype(int) - viz.overlay(img, salience.gradcam(model, x, 0, relu=False)[0],
                                                norm="minmax").astype(int)).max() <= 4  # 3: the two bilinear resizes


def test_a_map_that_does_not_fit_says_how_to_draw_it_anyway():
    """The refusal names the way out for a map that is this image's after all: resize it to the image."""
    with pytest.raises(SalienceError, match=r"interpolate"):
        viz.overlay(np.zeros((24, 37, 3), np.uint8), RNG.random((8, 21)))
