"""``keras_vis.visualize_saliency_with_losses``'s constant-map warning in its own terms: it takes ``losses`` (pairs of a
loss and a weight), not ``filter_indices`` nor a layer, and its losses need not be ActivationMaximization; the warning
said "from the explained filter_indices ... ActivationMaximization of it ... Try another seed_input, filter_indices or
layer". ``visualize_saliency`` (which runs through the same code) keeps its words."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "torch")

import salience  # noqa: E402
from salience.compat import keras_vis as kv  # noqa: E402

SEED = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))


def _dead() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # the ReLU is off everywhere for a seed in [0, 1]
    return net


def _said(call) -> str:
    with pytest.warns(UserWarning, match=r"the saliency map is constant") as record:
        call()
    (w,) = [w for w in record if "constant" in str(w.message)]
    assert w.filename == __file__
    return str(w.message)


@pytest.mark.parametrize("loss", [lambda: kv.ActivationMaximization("1", 1), lambda: salience.targets.classes(1)],
                         ids=["activation_maximization", "class_target"])
def test_with_losses_says_a_dead_map_in_its_own_terms(loss):
    text = _said(lambda: kv.visualize_saliency_with_losses(_dead(), [(loss(), -1.0), (loss(), 0.5)], SEED))
    assert "filter_indices" not in text and "ActivationMaximization" not in text
    assert "from the weighted sum of the losses" in text and "other losses or weights" in text


def test_with_losses_says_a_constant_map_after_the_modifier_in_its_own_terms():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        lin[1].weight.copy_(torch.stack([torch.full((12,), 0.5), torch.full((12,), 0.25)]))
    text = _said(lambda: kv.visualize_saliency_with_losses(lin, [(kv.ActivationMaximization("1", 0), -1.0)],
                                                           torch.rand(3, 2, 2)))
    assert text.startswith("the saliency map is constant (0.5) everywhere after grad_modifier='absolute'")
    assert "filter_indices" not in text and "or other losses or weights" in text


def test_visualize_saliency_keeps_its_words():
    text = _said(lambda: kv.visualize_saliency(_dead(), -1, 2, SEED))
    assert "from the explained filter_indices" in text and "ActivationMaximization of it" in text
    assert "losses" not in text
