"""Grad-CAM and Guided Grad-CAM: closed form, Captum, pytorch-grad-cam, default layers, one/two passes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, rules
from salience._core.autograd import gradients
from salience.targets import as_target
from salience._core.info import ModelInfo, attach_info
from salience.methods.gradcam import default_layer

from nets import CamNet
from conftest import unchanged
from hand_cams import assert_each_varies
from test_s49_record import ForwardLog



@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    torchvision = pytest.importorskip("torchvision")  # only the torchvision cases skip without it
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def x96():
    torch.manual_seed(1)
    return torch.rand(2, 3, 96, 96)  # layer4 of resnet18: 3 x 3


class VggLike(nn.Module):
    """Conv features, then a classifier with a ReLU: guided backprop changes the layer's gradient."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3))
        self.calls: list = ForwardLog()  # one per pass, appended to: the guard puts back a counter and a plain list

    def forward(self, x):
        self.calls.append(1)
        return self.classifier(self.features(x))


def test_closed_form_on_gap_linear_model():
    torch.manual_seed(0)
    m = CamNet()
    x = torch.randn(3, 3, 5, 7)
    t = torch.tensor([0, 3, 2])
    cam = salience.gradcam(m, x, t, layer="features")
    with torch.no_grad():
        a = m.features(x)  # (B, K, h, w)
        w = m.head.weight[t]  # (B, K): dS/dA_kij = W_tk / (h w)
        expected = ((w[:, :, None, None] / (5 * 7)) * a).sum(1).clamp(min=0)
    assert cam.shape == (3, 5, 7)
    assert_each_varies(expected)
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-7)
    assert (expected == 0).any() and (expected > 0).any()  # the ReLU matters here
    raw = salience.gradcam(m, x, t, layer=m.features, relu=False)
    torch.testing.assert_close(raw, ((w[:, :, None, None] / 35) * a).sum(1), rtol=1e-5, atol=1e-7)


def test_equals_captum_layer_gradcam(resnet, x96):
    captum_attr = pytest.importorskip("captum.attr")
    t = [3, 9]
    lgc = captum_attr.LayerGradCam(resnet, resnet.layer4)
    low = lgc.attribute(x96, target=t, relu_attributions=True)
    ref = captum_attr.LayerAttribution.interpolate(low, (96, 96), "bilinear")[:, 0]
    with unchanged(resnet):
        ours = salience.gradcam(resnet, x96, t, layer="layer4")
        ours_low = salience.gradcam(resnet, x96, t, layer=resnet.layer4, upsample=False)
        ours_signed = salience.gradcam(resnet, x96, t, layer="layer4", upsample=False, relu=False)
    assert ours.shape == (2, 96, 96) and ours_low.shape == (2, 3, 3)
    assert_each_varies(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_low, low[:, 0], rtol=1e-5, atol=1e-7)
    signed = lgc.attribute(x96, target=t, relu_attributions=False)[:, 0]
    assert (signed < 0).any()
    assert_each_varies(signed)
    torch.testing.assert_close(ours_signed, signed, rtol=1e-5, atol=1e-7)


def test_equals_pytorch_grad_cam(resnet, x96):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    t = [3, 9]
    targets = [ClassifierOutputTarget(c) for c in t]
    with pgc.GradCAM(model=resnet, target_layers=[resnet.layer4]) as cam:
        scaled = cam(input_tensor=x96, targets=targets)  # min-max scaled, resized with OpenCV
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        raw = np.maximum(cam.get_cam_image(x96, resnet.layer4, targets, acts, grads), 0)  # their cam, unscaled
    ours_low = salience.gradcam(resnet, x96, t, layer="layer4", upsample=False)
    assert_each_varies(torch.from_numpy(raw))
    torch.testing.assert_close(ours_low, torch.from_numpy(raw), rtol=1e-5, atol=1e-7)
    ours = salience.normalize(salience.gradcam(resnet, x96, t, layer="layer4"))
    torch.testing.assert_close(ours, torch.from_numpy(scaled), rtol=0, atol=1e-5)


def test_default_layers_of_common_architectures():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    expected = {"resnet18": "layer4", "vgg11": "features.19", "densenet121": "features",
                "mobilenet_v2": "features", "mobilenet_v3_small": "features", "efficientnet_b0": "features"}
    for arch, name in expected.items():
        m = getattr(torchvision.models, arch)(weights=None)
        with unchanged(m):
            assert default_layer(m, x) == name, arch
    assert default_layer(CamNet(), x) == "features"
    assert default_layer(VggLike(), x[:, :, :8, :8]) == "features"


def test_default_layer_prefers_given_names_and_is_used(x96):
    torch.manual_seed(0)
    m = CamNet()
    x = x96[:, :, :8, :8]
    assert torch.equal(salience.gradcam(m, x), salience.gradcam(m, x, layer="features"))
    attach_info(m, ModelInfo(default_layer="features.0"))
    assert default_layer(m, x) == "features.0"
    torch.testing.assert_close(salience.gradcam(m, x), salience.gradcam(m, x, layer="features.0"))
    m.salience_default_layer = "features.1"  # the model's own attribute comes first
    assert default_layer(m, x) == "features.1"
    object.__setattr__(m, "salience_default_layer", m.features[0])  # a module also works
    assert default_layer(m, x) == "features.0"
    m.salience_default_layer = "nope"
    with pytest.raises(SalienceError, match="no layer named 'nope'"):
        salience.gradcam(m, x)


def test_guided_gradcam_one_pass_when_no_relu_follows_the_layer(resnet, x96):
    t = [3, 9]
    with unchanged(resnet):
        ours = salience.guided_gradcam(resnet, x96, t, layer="layer4", reduce=None)
    gb = salience.guided_backprop(resnet, x96, t, reduce=None)
    cam = salience.gradcam(resnet, x96, t, layer="layer4")
    assert_each_varies(cam)
    torch.testing.assert_close(ours, gb * cam[:, None], rtol=1e-5, atol=1e-9)
    # The pass count: one pass (no second forward) when nothing rectifies after layer4.
    calls = []
    handle = resnet.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        salience.guided_gradcam(resnet, x96, t, layer="layer4")
    finally:
        handle.remove()
    assert len(calls) == 1
    captum_attr = pytest.importorskip("captum.attr")  # the peer's part (the checks above run without it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.GuidedGradCam(resnet, resnet.layer4).attribute(x96, target=t, interpolate_mode="bilinear")
    assert_each_varies(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-9)


def test_guided_gradcam_two_passes_when_relus_follow_the_layer():
    torch.manual_seed(5)  # each image's map varies (at seed 4 image 1's Grad-CAM at class 1 was 0)
    m = VggLike().eval()
    x = torch.randn(3, 3, 8, 8)
    t = [0, 1, 2]
    ours = salience.guided_gradcam(m, x, t, layer="features", reduce=None)
    assert len(m.calls) == 2
    gb = salience.guided_backprop(m, x, t, reduce=None)
    cam = salience.gradcam(m, x, t, layer="features")
    assert_each_varies(cam)
    torch.testing.assert_close(ours, gb * cam[:, None], rtol=1e-5, atol=1e-9)
    # Why two passes: the layer's gradient under the guided rule is not the plain one here.
    guided_pass = gradients(m, x, as_target(torch.tensor(t)), layers=["features"], extra_modes=[rules.guided()])
    plain_pass = gradients(m, x, as_target(torch.tensor(t)), layers=["features"])
    assert not torch.allclose(guided_pass.layer_grads[0], plain_pass.layer_grads[0], atol=1e-5)
    captum_attr = pytest.importorskip("captum.attr")  # the peer's part (the checks above run without it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.GuidedGradCam(m, m.features).attribute(x, target=t, interpolate_mode="bilinear")
    assert_each_varies(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_batch_equals_one_image_at_a_time(method, small_cnn):
    torch.manual_seed(5)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([1, 0, 3])
    fn = getattr(salience, method)
    batch = fn(small_cnn, x, t, layer="features.3")
    single = torch.cat([fn(small_cnn, x[i:i + 1], t[i:i + 1], layer="features.3") for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-7)


def test_model_unchanged_and_errors(small_cnn):
    small_cnn.train()
    small_cnn.head.weight.grad = torch.ones_like(small_cnn.head.weight)
    x = torch.randn(2, 3, 8, 8)
    with unchanged(small_cnn):
        salience.gradcam(small_cnn, x)
        salience.guided_gradcam(small_cnn, x, 2)
        with pytest.raises(SalienceError, match=r"\(B, K, h, w\).*\(2, 4\)"):
            salience.gradcam(small_cnn, x, layer="head")
        with pytest.raises(SalienceError, match="did you mean"):
            salience.gradcam(small_cnn, x, layer="feature.3")
        with pytest.raises(KeyboardInterrupt):
            salience.guided_gradcam(small_cnn, x, lambda out: (_ for _ in ()).throw(KeyboardInterrupt()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(small_cnn)
    for fn in (salience.gradcam, salience.guided_gradcam):
        with pytest.raises(SalienceError, match="TorchScript"):
            fn(scripted, x)


def test_registered_in_methods():
    for name in ("guided_backprop", "deconvnet", "gradcam", "guided_gradcam"):
        assert salience.METHODS[name] is getattr(salience, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    m = VggLike().eval()
    x = torch.randn(2, 3, 8, 8)
    cpu = (salience.gradcam(m, x), salience.guided_gradcam(m, x))
    gpu = (salience.gradcam(m.cuda(), x.cuda()), salience.guided_gradcam(m, x.cuda()))
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)


def test_layer_gradients_without_the_input_gradient(resnet, x96):
    """Grad-CAM asks only for the layer's gradient: same numbers, and backward stops at the layer."""
    t = [3, 9]
    both = gradients(resnet, x96, as_target(t), layers=["layer4"])
    only = gradients(resnet, x96, as_target(t), layers=["layer4"], input_grad=False)
    assert only.grad is None and both.grad is not None
    torch.testing.assert_close(only.layer_grads[0], both.layer_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(only.activations[0], both.activations[0], rtol=0, atol=0)
    # No backward runs through the stem (conv1) when only layer4's gradient is needed.
    seen = []
    handle = resnet.conv1.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    try:
        salience.gradcam(resnet, x96, t, layer="layer4")
        assert seen == []
        salience.vanilla(resnet, x96, t)
        assert seen == [1]  # the hook itself works: an input gradient goes through conv1
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["gradcam", "guided_gradcam", "gradcam_plus_plus", "hirescam", "xgradcam",
                                  "layercam", "eigencam", "scorecam", "ablationcam"])
def test_default_layer_found_inside_the_callers_inference_mode(name, small_cnn):
    """A caller inside ``torch.inference_mode()`` (a serving loop) gets the default layer and the map it
    gets outside. The search for the layer records a graph to see which outputs depend on the input,
    and ``enable_grad()`` alone records none in inference mode: every CAM said it "found no layer
    with a 4-D map" on a plain CNN, while vanilla and Grad-CAM with ``layer=`` worked."""
    small_cnn.eval()
    x = torch.rand(2, 3, 8, 8)
    fn = salience.METHODS[name]
    # class 2: each image's map varies (class 1's Grad-CAM, HiResCAM, XGrad-CAM were 0 on both images)
    expected = fn(small_cnn, x, 2)
    assert_each_varies(expected)
    assert torch.equal(fn(small_cnn, x, 2, layer=default_layer(small_cnn, x)), expected)
    with torch.inference_mode():
        assert default_layer(small_cnn, x) == "features"  # the last module with the feature maps
        with unchanged(small_cnn):
            ours = fn(small_cnn, x, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
