"""A dataset run's ``metric_steps`` is checked once, with the deletion / insertion cap (its passes, at most one a
pixel of the model's input size), before the run folder is made: a too-large value was every row's metric error."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import SalienceError
from salience._core.info import ModelInfo, attach_info


def _model(side):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return attach_info(net, ModelInfo(name="tiny", input_size=side))


def _images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    return root


def test_too_many_metric_steps_are_one_refusal_before_the_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SalienceError, match=r"metric_steps=2,000,000 \(1,002,000 passes, one a pixel\) is more than"):
        salience.explain_dataset(_model((1002, 1000)), _images(tmp_path), ["vanilla"], out, metrics=True,
                                 metric_steps=2_000_000, workers=0)
    assert not out.exists()


def test_metric_steps_past_the_pixels_of_a_small_input_still_run(tmp_path):
    out = tmp_path / "run"
    salience.explain_dataset(_model((8, 8)), _images(tmp_path), ["vanilla"], out, metrics=True,
                             metric_steps=10 ** 7, workers=0)  # cut to 64, one a pixel
    assert out.exists()
