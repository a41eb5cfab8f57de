"""Ablation-CAM under precision="bf16": autocast casts each weight once per call, not once per pass (issue 15)."""
import warnings

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import salience


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def _weight_casts(model: nn.Module, x: torch.Tensor, **kw) -> tuple[int, torch.Tensor]:
    """The copies of the second conv's weight (16, 8, 3, 3) made in one call, and its map."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            m = salience.ablationcam(model, x, 1, layer=model[0], chunk=2, precision="bf16", **kw)
    n = sum(e.count for e in p.key_averages(group_by_input_shape=True)
            if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0] == [16, 8, 3, 3])
    return n, m


def test_bf16_passes_cast_each_weight_once():
    model, x = _model(), torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    n, m = _weight_casts(model, x)
    # 8 channels x 2 images in chunks of 2: 8 passes (and the clean pass), each of which cast it before
    assert n <= 2, n
    # the map as the passes cast the weights each: the same autocast casts, the same values
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        _, again = _weight_casts(model, x)
    torch.testing.assert_close(m, again)


def test_requires_grad_restored():
    model, x = _model(), torch.rand(2, 3, 12, 12)
    model[2].weight.requires_grad_(False)
    _weight_casts(model, x)
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True, True, True]
    assert not torch.is_autocast_enabled("cpu")
