"""``evaluate_methods`` / ``bound_methods`` without ``methods``: the defaults are chosen with the ``grid=`` /
``prefix_tokens=`` the user gave in ``method_options`` (as ``salience evaluate --grid / --prefix-tokens`` does), so a
ViT-like model whose tokens read two ways keeps its CAMs and attention methods, each with its own options."""
from __future__ import annotations

import pytest
import torch
from test_s39_guided_defaults import _UnreadableViT

from salience import SalienceError
from salience.evidence.evaluate import bound_methods, evaluate_methods
from salience.methods import ATTENTION_METHODS, LAYER_METHODS


def _net():
    torch.manual_seed(0)
    return _UnreadableViT().eval()


@pytest.mark.parametrize("given", [{"prefix_tokens": 1}, {"grid": (4, 4)}])
def test_bound_methods_keep_the_cams_and_attention_methods_given_their_tokens(given):
    net, x = _net(), torch.rand(1, 3, 32, 32)
    options = {"gradcam": given, "attention_rollout": given}
    items = dict(bound_methods(net, x, None, options))
    assert {"gradcam", "attention_rollout"} <= set(items)
    assert items["gradcam"].keywords == given and items["attention_rollout"].keywords == given
    assert items["gradcam"](net, x).shape == (1, 32, 32)
    # a method without the options still cannot read the tokens: not kept on its own
    assert "transformer_attribution" not in items and "hirescam" not in items


def test_every_method_given_the_grid_is_kept():
    net, x = _net(), torch.rand(1, 3, 32, 32)
    options = {name: {"grid": (4, 4)} for name in sorted(LAYER_METHODS | ATTENTION_METHODS)}
    names = {n for n, _ in bound_methods(net, x, None, options)}
    assert (LAYER_METHODS | ATTENTION_METHODS) <= names


def test_evaluate_methods_scores_the_cam_given_the_grid():
    net, x = _net(), torch.rand(2, 3, 32, 32)
    rows, maps = evaluate_methods(net, x, methods=None, method_options={"gradcam": {"prefix_tokens": 1}},
                                  baselines=False, steps=4, randomization_images=1)
    row = {r.name: r for r in rows}["gradcam"]
    assert row.error is None and maps["gradcam"].shape == (2, 32, 32)


def test_a_bad_grid_in_method_options_is_refused_by_name():
    with pytest.raises(SalienceError, match="grid"):
        bound_methods(_net(), torch.rand(1, 3, 32, 32), None, {"gradcam": {"grid": (4, 0)}})
