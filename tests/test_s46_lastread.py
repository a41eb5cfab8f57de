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


# Score-CAM's blank channels (an all-zero mask: the image blanked) under precision="bf16": their one pass of a zero
# image ran inside the run's autocast block but through forward_scores, whose model_guard turns a caller's autocast
# off: float32 scores beside the live channels' bf16 ones (the permem merge's "one blank image" kept it so). A model
# whose output is a constant (its head's weights zero, its bias 0.3, which bf16 rounds to 0.30078125) scores every
# masked image alike at one precision: with softmax="channels" each of its D channels weighs 1/D, so the map is
# ReLU(mean_d A_d) exactly; a blank score in float32 beside the bf16 ones moved the weights by about 2e-4.
class _ConstantHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight[1].zero_()
            self.conv.bias[1] = -1.0  # channel 1 dead after the ReLU: its mask all zeros, a blank image
            self.head.weight.zero_()
            self.head.bias.fill_(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:precision=")
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_scorecam_blank_channels_scored_at_the_passes_precision(precision):
    torch.manual_seed(0)
    model = _ConstantHead().eval()
    x = torch.randn(2, 3, 8, 8)
    got = salience.scorecam(model, x, target=0, layer=model.relu, softmax="channels", precision=precision)
    with torch.no_grad():
        acts = model.relu(model.conv(x))
    assert bool((acts[:, 1] == 0).all()) and bool((acts[:, 0] > 0).any())
    ref = acts.mean(1).clamp(min=0)  # each channel's weight 1/2
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
