"""``viz.to_uint8_image`` and integer arrays. uint8 is pixels 0..255 (PIL's, torchvision's convention); a map is
float. Another integer dtype says nothing of its scale: it was read as 8-bit pixels whatever it held, so an integer
saliency or label map (values 0..9, an ``argmax``: int64) came out nearly black, and a float image in [0, 1] cast to
integers (``x.long()``: 0 and 1) black, without a word. Now:

- an integer array other than uint8 with 3 or 4 channels is pixels 0..255 (matplotlib's convention for integer
  RGB data), as before, unless all its values are 0 or 1 (a mask, or ``x.long()`` of a [0, 1] image, all zero
  then: a black picture is uint8 or float): refused;
- one with one channel (``(H, W)``, ``(1, H, W)``, ``(H, W, 1)``) is refused: that is a map's shape (an integer
  saliency map, a label map, a class-index map), and gray pixels are uint8. The error says what to pass for each.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience.render import viz

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 10, size=(6, 8))  # int64, values 0..9: a label map or an integer saliency map


@pytest.mark.parametrize("make", [
    lambda: LABELS, lambda: LABELS.astype(np.int32), lambda: LABELS[None], lambda: LABELS[..., None],
    lambda: torch.from_numpy(LABELS), lambda: torch.from_numpy(LABELS)[None], lambda: LABELS.astype(np.uint16),
    lambda: torch.rand(10, 6, 8, generator=torch.Generator().manual_seed(0)).argmax(0),
], ids=["int64", "int32", "1HW", "HW1", "tensor", "tensor-1HW", "uint16", "long-argmax"])
def test_a_one_channel_integer_array_is_refused_saying_what_to_pass(make):
    with pytest.raises(SalienceError, match=r"one-channel integer array .*is read as a map.*viz\.heatmap.*"
                                            r"uint8"):
        viz.to_uint8_image(make())


def test_the_map_drawn_as_the_error_says_shows_its_values():
    pic = viz.heatmap(LABELS.astype(np.float64), norm="minmax")
    assert pic.shape == (6, 8, 3) and len({tuple(p) for p in pic.reshape(-1, 3)}) == len(np.unique(LABELS))


@pytest.mark.parametrize("x", [torch.rand(3, 6, 8).long(), np.ones((6, 8, 3), np.int64),
                               (RNG.random((2, 3, 6, 8)) > 0.5).astype(np.int32)],
                         ids=["long-of-float-image", "ones-hwc", "mask-batch"])
def test_integer_pixels_that_are_all_0_or_1_are_refused(x):
    with pytest.raises(SalienceError, match=r"integer image \(dtype \w+\) holds only 0 and 1.*x\.float\(\).*x \* 255"):
        viz.to_uint8_image(x)


def test_integer_rgb_pixels_are_read_as_0_to_255_and_uint8_as_before():
    rgb = RNG.integers(0, 256, size=(6, 8, 3))  # int64 (np.array of Python ints)
    assert np.array_equal(viz.to_uint8_image(rgb), rgb.astype(np.uint8))
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    assert np.array_equal(viz.to_uint8_image(chw), rgb.astype(np.uint8))
    gray = LABELS.astype(np.uint8)  # uint8 is pixels, one channel included (a gray picture)
    assert np.array_equal(viz.to_uint8_image(gray), np.repeat(gray[..., None], 3, axis=-1))
    with pytest.raises(SalienceError, match=r"must lie in 0\.\.255"):
        viz.to_uint8_image(rgb * 257)  # 16-bit values


def test_save_png_of_an_integer_map_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(SalienceError, match="read as a map"):
        viz.save_png(tmp_path / "m.png", LABELS)
    assert not list(tmp_path.iterdir())
