"""Several targets per image in one call: every method gives (B, K, ...) equal to K separate calls."""
from __future__ import annotations

import pytest
import torch

import salience
from salience import targets

from conftest import unchanged

ONE_PASS = ["vanilla", "guided_backprop", "deconvnet", "input_x_gradient"]
ALL = ONE_PASS + ["gradcam", "guided_gradcam"]


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.rand(3, 3, 16, 16)


def _method(name):
    fn = salience.METHODS[name]
    return (lambda m, x, t, **kw: fn(m, x, t, layer="features.5", **kw)) if "gradcam" in name else fn


@pytest.mark.parametrize("name", ALL)
def test_k_targets_equal_k_calls(name, small_cnn, x):
    fn = _method(name)
    k = torch.tensor([[0, 1, 3], [2, 2, 0], [3, 1, 2]])
    with unchanged(small_cnn):
        both = fn(small_cnn, x, k)
    single = torch.stack([fn(small_cnn, x, k[:, j]) for j in range(k.shape[1])], dim=1)
    assert both.shape == single.shape == (3, 3, 16, 16)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)
    # The raw, per-channel form has the K axis too.
    if "gradcam" != name:
        raw = fn(small_cnn, x, k, reduce=None)
        assert raw.shape == (3, 3, 3, 16, 16)


@pytest.mark.parametrize("name", ONE_PASS)
def test_k_targets_share_one_forward(name, small_cnn, x):
    calls = []
    handle = small_cnn.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        salience.METHODS[name](small_cnn, x, torch.tensor([[0, 1, 2, 3]] * 3))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_mixed_target_list(small_cnn, x):
    """A list holding None (the predicted class) and other targets is several targets."""
    out = salience.vanilla(small_cnn, x, [None, 2, targets.multilabel([0, 1])])
    assert out.shape == (3, 3, 16, 16)
    torch.testing.assert_close(out[:, 0], salience.vanilla(small_cnn, x))
    torch.testing.assert_close(out[:, 1], salience.vanilla(small_cnn, x, 2))
    torch.testing.assert_close(out[:, 2], salience.vanilla(small_cnn, x, targets.multilabel([0, 1])))
    # A plain list of ints is still one class per image, not several targets.
    assert salience.vanilla(small_cnn, x, [0, 1, 2]).shape == (3, 16, 16)


def test_k_targets_out_of_range(small_cnn, x):
    with pytest.raises(salience.SalienceError, match="range|out of"):
        salience.vanilla(small_cnn, x, torch.tensor([[0, 9]] * 3))
