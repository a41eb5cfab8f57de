"""Review of occlusion's region-limited passes (session 44, :mod:`salience.methods._occlusion_local`): defects found
on the merged code, each with the test that failed there."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import salience
from test_s44_fold_threads import beside_other_threads


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_tracing_leaves_other_threads_models_alone():
    """torch.fx's tracer patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces:
    another thread's model call in that time raised ``NameError: module is not installed as a submodule`` (an
    unrelated model) or got proxies (the same model). The other thread's calls must run as they are, and the map
    must still be full passes'."""
    torch.manual_seed(0)
    other, mine = small(), small()
    x_other = torch.randn(1, 3, 16, 16)
    x = torch.randn(1, 3, 24, 24)
    maps, errors = beside_other_threads(
        (other, mine), x_other, lambda: [salience.occlusion(mine, x, 0, window=6, stride=6) for _ in range(6)])
    assert not errors, (len(errors), errors[:3])
    full = salience.occlusion(mine, x, 0, window=6, stride=6, local=False)
    for a in maps:
        assert float((a - full).abs().max()) <= 1e-5 * (1 + float(mine(x).detach().abs().max()))


class ClampByMap(nn.Module):
    """A clamp by a buffer that varies over the image: traced as local, it fails on a crop (a broadcast error), so
    the check falls back to full passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("floor", torch.randn(1, 1, 20, 20))
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).clamp(min=self.floor)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_check_falling_back_prints_nothing(capfd):
    """A split that fails the check on the clean images falls back quietly (a debug log line, as documented): the
    merged code let torch.fx's GraphModule print the error's traceback to stderr (24 lines) on every call."""
    torch.manual_seed(0)
    m = ClampByMap().eval()
    x = torch.randn(1, 3, 20, 20)
    capfd.readouterr()
    a = salience.occlusion(m, x, 0, window=4, stride=2)
    out, err = capfd.readouterr()
    assert err == "" and out == "", err[:400]
    b = salience.occlusion(m, x, 0, window=4, stride=2, local=False)
    assert torch.equal(a, b)
