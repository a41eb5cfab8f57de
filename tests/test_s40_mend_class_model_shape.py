"""class_model's ``shape=`` past the 50-megapixel input cap (the one ``visualize --size`` and ModelInfo sizes have) is
a SalienceError before anything is allocated: (3, 10**6, 10**6) asked torch for 12 TB (a raw RuntimeError) and
(3, 10**300, 10**300) failed with a raw TypeError."""
import pytest
from torch import nn

import salience
from salience import SalienceError
from salience._core import tensors
from salience.loading import images


def _model():
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("side", [10 ** 6, 10 ** 300, 7072])
def test_a_huge_shape_is_refused_by_the_input_cap(side):
    with pytest.raises(SalienceError, match="50,000,000"):
        salience.class_model(_model(), 0, shape=(3, side, side), steps=1)


def test_a_shape_at_the_cap_is_allowed_and_the_cap_lives_in_core():
    assert images.MAX_INPUT_PIXELS is tensors.MAX_INPUT_PIXELS == 50_000_000
    assert images.check_input_pixels is tensors.check_input_pixels
    tensors.check_input_pixels((7071, 7071), "shape")  # 49,999,041 pixels: within
    out = salience.class_model(_model(), 0, shape=(3, 8, 8), steps=1)
    assert tuple(out.shape[-2:]) == (8, 8)
