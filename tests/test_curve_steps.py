"""Deletion / insertion with more steps than pixels: at most one step per pixel (``H * W + 1`` points).

The model is the sum of the pixels, the image 2 x 2 with values 4, 3, 2, 1 and the map the image
itself, the substrate zero: removing the most salient pixels first the sum goes 10, 6, 3, 1, 0 (the
trapezoid area over the 4 pixel counts: (10 + 6 + 3 + 1 + 0 - (10 + 0) / 2) / 4 = 3.75); inserting
them, 0, 4, 7, 9, 10 (area (30 - 5) / 4 = 6.25). Before, steps=8 took the pixel counts round(k / 2)
(0, 0, 1, 2, 2, 2, 3, 4, 4: Python's round of 0.5 is 0, of 2.5 is 2), weighing 10 and 3 thrice and 6
once: an area of 3.875, and steps=10**6 ran 10**6 + 1 perturbed images for the same 5 sums.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from salience.evidence import deletion, deletion_curves, insertion, insertion_curves


class _Sum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum((1, 2, 3))[:, None]


X = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
KW = dict(substrate="zero", probability=False)


@pytest.mark.parametrize("steps", [4, 8, 10 ** 6])
def test_more_steps_than_pixels_give_the_per_pixel_curve(steps):
    start = time.perf_counter()
    torch.testing.assert_close(deletion_curves(_Sum(), X, X[:, 0], steps=steps, **KW),
                               torch.tensor([[10.0, 6.0, 3.0, 1.0, 0.0]]))
    torch.testing.assert_close(insertion_curves(_Sum(), X, X[:, 0], steps=steps, **KW),
                               torch.tensor([[0.0, 4.0, 7.0, 9.0, 10.0]]))
    torch.testing.assert_close(deletion(_Sum(), X, X[:, 0], steps=steps, **KW), torch.tensor([3.75]))
    torch.testing.assert_close(insertion(_Sum(), X, X[:, 0], steps=steps, **KW), torch.tensor([6.25]))
    assert time.perf_counter() - start < 5


def test_fewer_steps_than_pixels_are_as_before():
    """steps=2 of 4 pixels: 0, 2, 4 pixels removed, sums 10, 3, 0, area (13 - 5) / 2 = 4."""
    torch.testing.assert_close(deletion_curves(_Sum(), X, X[:, 0], steps=2, **KW), torch.tensor([[10.0, 3.0, 0.0]]))
    torch.testing.assert_close(deletion(_Sum(), X, X[:, 0], steps=2, **KW), torch.tensor([4.0]))


def test_the_default_steps_on_a_4x4_image():
    """The default steps (32 here, 24 in salience evaluate) on a 4 x 4 image: 17 points, pixel by pixel.
    Pixel values 16 .. 1 removed largest first: the sum after j pixels is sum(16 - j .. 1)."""
    x = torch.arange(16.0, 0.0, -1.0).reshape(1, 1, 4, 4)
    want = torch.tensor([[float(sum(range(1, 17 - j))) for j in range(17)]])
    for steps in (24, 32):
        torch.testing.assert_close(deletion_curves(_Sum(), x, x[:, 0], steps=steps, **KW), want)
    area = (want.sum() - (want[0, 0] + want[0, -1]) / 2) / 16
    torch.testing.assert_close(deletion(_Sum(), x, x[:, 0], **KW), area.reshape(1))
