"""The explorer's own cap is EXPLORER_MAX_PASSES (it was MAX_PASSES = 100,000, the name of the engine's million) and
counts occlusion windows too (window 1, stride 1 on 400 x 400 is 160,000 passes); integrated gradients' steps cap is
the engine's check, said as every many-pass count's (thousands separators, "passes of each image")."""
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import engine
from salience.explore import compute


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


def test_the_explorer_cap_has_its_own_name():
    assert compute.EXPLORER_MAX_PASSES == 100_000 and not hasattr(compute, "MAX_PASSES")


def test_the_explorer_counts_occlusion_windows():
    x = torch.zeros(1, 3, 400, 400)
    with pytest.raises(SalienceError, match="160000 windows, at most 100000 in the explorer"):
        compute._check_windows(x, {"window": 1, "stride": 1})
    compute._check_windows(x, {"window": 2, "stride": 2})  # 40,000 windows
    compute._check_windows(x, {"window": 500})  # larger than the image: the method's own check speaks


def test_integrated_gradients_steps_cap_reads_as_the_engines():
    x = torch.rand(1, 3, 4, 4)
    n = engine.MAX_PASSES + 1
    with pytest.raises(SalienceError) as ig:
        salience.integrated_gradients(_NoPass(), x, 0, steps=n)
    with pytest.raises(SalienceError) as rise:
        salience.rise(_NoPass(), x, 0, masks=n)
    tail = "more than the 1,000,000 passes of each image a call runs here"
    assert tail in str(ig.value) and tail in str(rise.value)
    assert "1,000,001 would take 17 minutes" in str(ig.value)
