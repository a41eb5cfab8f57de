"""Last read of session 46: defects where two of its merges meet.

``clean_batch``'s memory probe (the permem merge: one pass of the first image under ``max_memory``) against a model
that changes its input in place (``x -= mean`` in its forward, which the review of that merge made the capture refuse
where it would run a pass twice): the probe ran the model on a view of the user's first image, so that image was
changed once more than the others before the clean pass, and the call's maps with ``max_memory`` were not those
without it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience


class _ShiftsItsInput(nn.Module):
    """Subtracts a constant from its input in place in its forward (a normalization written ``x -= mean``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.25)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _call(method: str, max_memory):
    torch.manual_seed(0)
    model = _ShiftsItsInput().eval()
    x = torch.randn(2, 3, 8, 8)
    kw = dict(chunk=4, max_memory=max_memory)  # the same chunks either way: max_memory sizes the clean passes only
    if method == "rise":
        maps = salience.rise(model, x, target=0, masks=8, seed=1, **kw)
    elif method == "occlusion":
        maps = salience.occlusion(model, x, target=0, window=4, stride=4, **kw)
    else:
        maps = getattr(salience, method)(model, x, target=0, layer=model.conv, **kw)
    return maps, x


@pytest.mark.parametrize("method", ["rise", "occlusion", "scorecam", "ablationcam"])
def test_max_memory_probe_does_not_change_the_users_images(method):
    # max_memory sizes the clean passes only (chunk fixes the passes' chunks): the reference is the same call without
    # it, which runs no probe pass (a model changing its input in place changes the user's x in the clean passes of
    # either call, the same number of times)
    plain, x_plain = _call(method, None)
    probed, x_probed = _call(method, 1 << 30)
    assert torch.equal(x_probed, x_plain)  # main: image 0 shifted twice (the probe's pass and the clean one)
    assert torch.allclose(probed, plain, rtol=0, atol=1e-6)
