"""Grad-CAM at torchvision DenseNet's default layer ``features``, which the forward follows by
``F.relu(features, inplace=True)``: the map must be built from ``features``' own output and its own gradient
(before session 41 salience read the tensor after the in-place ReLU, as pytorch-grad-cam does on a CPU).

Closed form: after ``features`` the head is ``relu -> global average pool -> linear``, so the gradient of class
``t``'s logit at ``A_kij`` is ``W_tk / (h w) * [A_kij > 0]`` and Grad-CAM is
``relu(sum_k mean_ij(grad_kij) * A_kij)`` on ``features``' own (signed) output. Captum's ``LayerGradCam`` agrees.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import salience


@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(0)
    return torchvision.models.densenet121().eval()


def test_densenet_gradcam_is_the_closed_form_on_features_own_output(densenet):
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 64, 64), [3, 7]
    with torch.no_grad():
        a = densenet.features(x)  # (B, K, h, w), signed: the in-place ReLU comes after
    assert (a < 0).any()  # otherwise the ReLU changes nothing and the test could not fail
    h, w = a.shape[-2:]
    grad = densenet.classifier.weight.detach()[t][:, :, None, None] / (h * w) * (a > 0)
    low = (grad.mean((2, 3), keepdim=True) * a).sum(1).clamp(min=0)
    ref = F.interpolate(low[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ours = salience.gradcam(densenet, x, t)
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_densenet_gradcam_equals_captum(densenet):
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(2)
    x, t = torch.randn(2, 3, 64, 64), [1, 4]
    low = captum_attr.LayerGradCam(densenet, densenet.features).attribute(x, target=t, relu_attributions=True)
    ours = salience.gradcam(densenet, x, t, layer=densenet.features, upsample=False)
    torch.testing.assert_close(ours, low[:, 0], rtol=1e-4, atol=1e-6)
