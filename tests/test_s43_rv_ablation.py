"""Review of session 43's Ablation-CAM sharing (the layers before the layer once per run of an image's items).

The sharing is trusted after a check once per call: two items of one image run shared and one by one, their scores
compared. Its tolerance was a relative 1e-3 of the scores; Ablation-CAM's signal is the drop ``S - S_k``, which for
one channel of hundreds is itself about 1e-3 of ``S`` or less, so a rest that mixes the items' rows by about the
drops passed the check and gave a wrong map. The references: the paper's formula, one image and one channel at a
time (test_scorecam's)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience

from conftest import unchanged
from test_scorecam import _ablation_reference


class PerImageGain(nn.Module):
    """The rest divides each image's features by their mean, the batch size read from ``x`` (a natural line):
    on the shared pass ``x`` has one row and the mean is the run's items' together, close to each item's (they differ
    by one ablated channel of 256), so the scores differ by about the drops themselves."""

    def __init__(self, c: int = 256):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        b = x.shape[0]
        h = self.conv(x).relu()
        h = h / h.reshape(b, -1).mean(1).view(b, 1, 1, 1)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("chunk", [None, 64])
def test_ablationcam_check_catches_a_mixing_of_the_size_of_the_drops(chunk):
    """Before the fix the check passed (scores within 1e-3 of S) and the map was 0.8 of its largest value off."""
    torch.manual_seed(0)
    model = PerImageGain().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = torch.cat([_ablation_reference(model, model.conv, x[i:i + 1], 1) for i in range(2)])
    with unchanged(model):
        ours = salience.ablationcam(model, x, 1, layer=model.conv, upsample=False, chunk=chunk)
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
