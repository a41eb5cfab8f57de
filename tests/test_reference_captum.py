"""Vanilla saliency equals Captum's Saliency on real architectures with random weights."""
from __future__ import annotations

import pytest
import torch

import salience

captum_attr = pytest.importorskip("captum.attr")
models = pytest.importorskip("torchvision.models")


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_vanilla_equals_captum_saliency(arch):
    torch.manual_seed(0)
    model = getattr(models, arch)(weights=None).eval()
    x = torch.rand(2, 3, 64, 64)
    target = torch.tensor([3, 917])
    ours = salience.vanilla(model, x, target)
    theirs = captum_attr.Saliency(model).attribute(x, target=target, abs=True).amax(dim=1)
    assert ours.shape == (2, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    # The default target is the predicted class, as Captum's with target=argmax.
    pred = model(x).argmax(1)
    theirs_pred = captum_attr.Saliency(model).attribute(x, target=pred, abs=True).amax(dim=1)
    torch.testing.assert_close(salience.vanilla(model, x), theirs_pred, rtol=1e-4, atol=1e-7)


def test_resnet_in_train_mode_is_explained_in_eval_mode_and_restored():
    from conftest import unchanged

    torch.manual_seed(0)
    model = models.resnet18(weights=None)
    model.train()
    x = torch.rand(2, 3, 64, 64)
    with unchanged(model):
        ours = salience.vanilla(model, x, 5, reduce=None)
    model.eval()
    theirs = captum_attr.Saliency(model).attribute(x, target=5, abs=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
