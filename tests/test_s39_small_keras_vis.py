"""``salience.keras_vis`` and a constant map. ``visualize_saliency`` scales the map to [0, 1] by
``(m - min) / (max - min + 1e-7)``, so a constant map (a dead unit: no gradient reached the input) came back as all
zeros, indistinguishable from "nothing salient", without a word (keras-vis and tf-keras-vis say nothing either).
Now a UserWarning says the map is constant, and why it likely is, at the user's line, as salience's command line
and explorer say of a constant map (``viz.constant_map_note``: warnings, raw values kept); the map returned is
keras-vis's all the same."""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "torch")

from salience.compat import keras_vis as kv  # noqa: E402


def _net(dead: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    if dead:
        with torch.no_grad():
            net[0].bias.fill_(-100.0)  # the ReLU is off everywhere for a seed in [0, 1]: no gradient gets through
    return net


SEED = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("call", [
    lambda m: kv.visualize_saliency(m, -1, 2, SEED),
    lambda m: kv.visualize_saliency(m, -1, [1, 3], SEED, backprop_modifier="guided"),
    lambda m: kv.visualize_saliency(m, -1, 0, SEED, grad_modifier="small_values"),  # 1e7 everywhere: still no gradient
    lambda m: kv.visualize_saliency(m, "4", 0, SEED, keepdims=True),
    lambda m: kv.visualize_saliency_with_losses(m, [(kv.ActivationMaximization("1", 1), -1.0)], SEED),
], ids=["class", "guided", "small_values", "keepdims", "losses"])
def test_a_dead_unit_map_is_said_to_be_constant_and_why(call):
    with pytest.warns(UserWarning, match=r"the saliency map is constant \(zero\) everywhere: no gradient reached the "
                                         r"input.*dead unit.*all zeros") as said:
        heat = call(_net(dead=True))
    assert said[0].filename == __file__  # the user's line
    assert not np.any(heat)  # keras-vis's map, unchanged: (m - min) / (max - min + 1e-7) of a constant


def test_a_map_made_constant_by_the_modifier_says_so():
    """A gradient negative everywhere under ``grad_modifier="relu"``, and a gradient that is one value everywhere:
    the input is reached, but every pixel gets the same value."""
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        lin[1].weight.copy_(torch.stack([-torch.rand(12, generator=torch.Generator().manual_seed(2)) - 0.1,
                                         torch.full((12,), 0.5)]))
    seed = torch.rand(3, 2, 2)
    with pytest.warns(UserWarning, match=r"the saliency map is constant \(0\) everywhere after grad_modifier='relu'"
                                         r" and the channels' maximum.*all zeros"):
        kv.visualize_saliency(lin, -1, 0, seed, grad_modifier="relu")
    with pytest.warns(UserWarning, match=r"the saliency map is constant \(0\.5\) everywhere after "
                                         r"grad_modifier='absolute'"):
        kv.visualize_saliency(lin, -1, 1, seed)


def test_a_map_that_varies_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heat = kv.visualize_saliency(_net(dead=False), -1, 2, SEED)
    assert heat.min() == 0 and 0.99 < heat.max() <= 1


def test_a_keras_models_dead_unit_too():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras differently
        pytest.skip("keras was imported with another backend in this process")
    with torch.random.fork_rng():  # keras seeds Python's, numpy's and torch's generators: none kept for later files
        state, np_state = random.getstate(), np.random.get_state()
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(4, 3, activation="relu", bias_initializer=keras.initializers.Constant(-100.0))(inp)
        out = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(h))
        model = keras.Model(inp, out)
        random.setstate(state)
        np.random.set_state(np_state)
    with pytest.warns(UserWarning, match=r"the saliency map is constant \(zero\) everywhere"):
        heat = kv.visualize_saliency(model, -1, 2, SEED.permute(1, 2, 0).numpy())
    assert heat.shape == (8, 8) and not np.any(heat)
