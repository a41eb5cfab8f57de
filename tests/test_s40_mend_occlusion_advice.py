"""Occlusion's cap on windows suggests options whose windows cover the image (stride at most the window): window 1,
stride 1 on 1200 x 1200 advised stride=2, which leaves 3 of 4 pixels never occluded."""
import re

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import engine
from salience.methods.perturbation import window_count


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


@pytest.mark.parametrize("window", [1, 64, (1, 3)])
def test_the_suggested_options_cover_the_image_within_the_cap(window):
    x = torch.rand(1, 3, 1200, 1200)
    with pytest.raises(SalienceError) as e:
        salience.occlusion(_NoPass(), x, 0, window=window, stride=1)
    said = re.search(r"e\.g\. (.*)$", str(e.value)).group(1)
    options = eval(f"dict({said})")  # noqa: S307 - the message's own Python keywords
    win = options.get("window", window)
    win = (win, win) if isinstance(win, int) else tuple(win)
    st = (options["stride"],) * 2
    assert st[0] <= min(win)  # the windows touch or overlap: every pixel occluded by one
    assert window_count(1200, 1200, win, st) <= engine.MAX_PASSES
