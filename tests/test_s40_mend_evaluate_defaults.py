"""The default methods of ``evaluate`` given ``grid`` / ``prefix_tokens`` in ``method_options``: the token-aware
choice only adds methods. GradCAM given ``grid=(4, 4)`` on a CNN was dropped from the defaults and refused as "not one
of the methods run" instead of by its own grid check; ``salience evaluate --grid`` picks with the same helper."""
from __future__ import annotations

import pytest
import torch
from test_s39_guided_defaults import _UnreadableViT
from torch import nn

from salience import SalienceError
from salience.cli.evaluate_cmd import default_choice
from salience.evidence.evaluate import bound_methods, default_names
from salience.methods import METHODS, default_methods
from salience.methods.options import accepted


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_a_cam_given_a_grid_on_a_cnn_is_kept_so_its_own_check_speaks():
    net, x = _cnn(), torch.rand(1, 3, 16, 16)
    items = dict(bound_methods(net, x, None, {"gradcam": {"grid": (4, 4)}}))
    assert set(default_methods(net, x)) == set(items)  # nothing dropped, nothing added
    with pytest.raises(SalienceError) as e:
        items["gradcam"](net, x, 0)
    assert "grid" in str(e.value) and "not one of the methods run" not in str(e.value)


@pytest.mark.parametrize("make", [_cnn, lambda: _UnreadableViT().eval()])
@pytest.mark.parametrize("given", [{}, {"grid": (4, 4)}, {"prefix_tokens": 1}])
def test_the_cli_and_python_choose_the_same_defaults(make, given):
    torch.manual_seed(0)
    net, x = make(), torch.rand(1, 3, 32, 32)
    per_method = {n: dict(given) for n, fn in METHODS.items() if given and set(given) <= set(accepted(fn))}
    want = default_names(net, x, per_method)
    assert default_choice(net, x, given) == want
    assert set(default_methods(net, x)) <= set(want)  # the token-aware choice only adds
