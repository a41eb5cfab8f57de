"""SmoothGrad's cap on samples x the inner method's passes: a numpy integer count is checked like an int (it escaped
``isinstance(inner, int)``), and a ``functools.partial`` inner method is named by its function ("of method with")."""
import functools

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


def test_a_numpy_steps_count_is_capped():
    with pytest.raises(SalienceError, match="integrated_gradients with steps=1000"):
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), 0, method=salience.integrated_gradients,
                            samples=10_000, steps=np.int64(1000))


def test_a_partial_inner_method_is_named_by_its_function():
    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), 0, method=functools.partial(salience.rise, masks=4000),
                            samples=1000)
    assert "of rise with masks=4000" in str(e.value) and "4,000,000 passes" in str(e.value)
