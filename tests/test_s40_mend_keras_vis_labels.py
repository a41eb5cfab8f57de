"""keras_vis's passes w.r.t. ``wrt_tensor`` say an option not applied under one label scheme, plain or guided:
"keras_vis wrt_tensor= (plain gradient)" / "(guided_backprop)". The guided pass said "guided_backprop", so a
guided_backprop call before it in the process silenced its own warning."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from test_s39_attnperf_matrix import _model

os.environ.setdefault("KERAS_BACKEND", "torch")

import salience  # noqa: E402
from salience.compat import keras_vis as kv  # noqa: E402

SEED = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("fresh_perf_state")


def _said(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as said, salience.performance(fold_batchnorm=True):
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in said if "fold_batchnorm=True is not applied" in str(w.message)]


@pytest.mark.parametrize("modifier, label", [(None, "plain gradient"), ("guided", "guided_backprop"),
                                             ("relu", "deconvnet")])
def test_each_wrt_tensor_pass_says_its_own_label(modifier, label):
    m = _model("vanilla")
    _said(lambda: salience.guided_backprop(m, SEED[None], 1))  # the method's own warning, said first
    said = _said(lambda: kv.visualize_saliency(m, "head", 1, SEED, wrt_tensor="features.2", backprop_modifier=modifier))
    assert len(said) == 1 and said[0].startswith(f"keras_vis wrt_tensor= ({label}): "), said
    assert "wrt_tensor's" in said[0]
