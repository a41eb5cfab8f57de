"""``keras_vis`` with ``wrt_tensor=`` and ``backprop_modifier=None`` (the plain gradient w.r.t. a layer's output) under
the performance options set for the process: ``precision`` and ``memory_format`` are applied to its pass (seen in the
first convolution's output dtype / input strides), ``compile`` and ``fold_batchnorm`` (the layer is read with a hook)
said once at the user's line; as ``backprop_modifier="guided"`` with ``wrt_tensor=`` does. It ran in float32 and the
model's layout without a word. An fp16 pass whose gradient overflows float16 is refused, not a NaN map."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from test_s39_attnperf_matrix import _Graphs, _hooked, _model, _with

os.environ.setdefault("KERAS_BACKEND", "torch")

import salience  # noqa: E402
from salience.compat import keras_vis as kv  # noqa: E402

SEED = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
MODIFIERS = [None, "guided"]


pytestmark = pytest.mark.usefixtures("fresh_perf_state")


def _call(m: nn.Module, modifier) -> np.ndarray:
    return kv.visualize_saliency(m, "head", 1, SEED, wrt_tensor="features.2", backprop_modifier=modifier)


def _ours(said, option: str) -> list:
    return [w for w in said if f": {option}=" in str(w.message) and "is not applied" in str(w.message)]


@pytest.mark.parametrize("modifier", MODIFIERS)
def test_precision_is_applied(modifier):
    m, dtypes = _model("vanilla"), []
    ref = _call(m, modifier)
    got, said = _hooked(m, False, lambda mod, i, o: dtypes.append(o.dtype),
                        lambda: _with({"precision": "bf16"}, lambda: _call(m, modifier), m))
    assert torch.bfloat16 in dtypes and not _ours(said, "precision")
    # the same map, to bf16's precision: the documented bf16 bound on a CPU, the largest difference at most 0.1 of the
    # map's largest value (docs/performance.md, "precision"; test_performance.py's BF16_ATOL), here in absolute terms
    # since keras-vis's maps are normalized to [0, 1) (their largest value just below 1)
    assert got.dtype == ref.dtype and np.abs(got - ref).max() < 0.1


@pytest.mark.parametrize("modifier", MODIFIERS)
def test_channels_last_is_applied(modifier):
    m, layouts = _model("vanilla"), []
    ref = _call(m, modifier)
    got, said = _hooked(m, True, lambda mod, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)),
                        lambda: _with({"memory_format": "channels_last"}, lambda: _call(m, modifier), m))
    assert any(layouts) and not _ours(said, "memory_format")
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("modifier", MODIFIERS)
@pytest.mark.parametrize("option", [{"compile": None}, {"fold_batchnorm": True}], ids=["compile", "fold_batchnorm"])
def test_compile_and_folding_are_said_once_at_the_users_line(modifier, option):
    m = _model("vanilla")
    graphs = _Graphs()
    option = {"compile": graphs} if "compile" in option else option
    (key,) = option
    _, said = _with(option, lambda: [_call(m, modifier), _call(m, modifier)], m)
    ours = _ours(said, key)
    assert len(ours) == 1 and ours[0].filename == __file__ and graphs.n == 0


class _Loud(nn.Module):
    """A gradient of 1e7 / 16 at its convolution's output where the ReLU is on: past float16's 65504."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.fill_(1e7)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("modifier", MODIFIERS)
def test_an_fp16_overflow_is_refused(modifier):
    m = _Loud().eval()
    seed = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    call = lambda: kv.visualize_saliency(m, "head", 1, seed, wrt_tensor="conv", backprop_modifier=modifier)  # noqa
    assert np.isfinite(call()).all()
    with salience.performance(precision="fp16"), pytest.raises(salience.SalienceError, match="overflow float16"):
        call()
