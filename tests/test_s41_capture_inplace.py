"""A layer's output that an in-place operation later in the forward changes: torchvision's ResNet blocks run
``out = self.bn2(out); out += identity; out = self.relu(out)`` (ReLU ``inplace=True``), so a forward hook on ``bn2``
that keeps its output without a copy reads ``relu(bn2 + identity)`` after the pass, and the gradient w.r.t. that
tensor is the gradient w.r.t. the block's output. Each layer method at ``layer4[-1].bn2`` of a random resnet18 is
compared with the paper's formula written out on a copy of the model without in-place operations (every
``inplace=False``, ``out = out + identity``): its ``bn2`` output and the gradient w.r.t. it by
``torch.autograd.grad``. At the default layer (``layer4``, nothing in place after it) the maps are the plain
capture's bit for bit, from one pass."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience
from salience.methods import METHODS
from salience.methods.gradcam import _gradcam_map, upsample_maps

from conftest import unchanged

torchvision = pytest.importorskip("torchvision")

TARGET = 3
SIZE = 48  # layer4's output is 2 x 2


def _plain_block(self: nn.Module, x: Tensor) -> Tensor:
    """torchvision's BasicBlock.forward with ``out = out + identity`` (not ``+=``)."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def _without_inplace(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
        if isinstance(m, torchvision.models.resnet.BasicBlock):
            m.forward = types.MethodType(_plain_block, m)
    return ref


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    ref = _without_inplace(model)
    kept: list[Tensor] = []
    handle = ref.layer4[-1].bn2.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = ref(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)  # the same function
    (g,) = torch.autograd.grad(out[:, TARGET].sum(), kept[0])
    return model, x, ref, kept[0].detach(), g


def _up(cam: Tensor) -> Tensor:
    """``(B, h, w)`` -> ``(B, H, W)``: ReLU, then bilinear with ``align_corners=False``."""
    return F.interpolate(cam.clamp(min=0)[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]


def _close(got: Tensor, want: Tensor) -> None:
    assert want.abs().max() > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), \
        float((got - want).abs().max())


def _gradient_reference(name: str, a: Tensor, g: Tensor) -> Tensor:
    s = a.sum(dim=(2, 3), keepdim=True)
    if name == "gradcam":  # ReLU(sum_k mean_ij(G_k) A_k)
        return _up((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    if name == "hirescam":  # ReLU(sum_k G_k * A_k)
        return _up((g * a).sum(1))
    if name == "layercam":  # ReLU(sum_k ReLU(G_k) * A_k)
        return _up((g.clamp(min=0) * a).sum(1))
    if name == "xgradcam":  # w_k = sum_ij (A_kij / S_k) G_kij
        return _up(((a / s * g).sum(dim=(2, 3), keepdim=True) * a).sum(1))
    assert name == "gradcam_plus_plus"  # alpha = G^2 / (2 G^2 + S G^3), w_k = sum_ij alpha ReLU(G)
    alpha = torch.where(g != 0, g ** 2 / (2 * g ** 2 + s * g ** 3), torch.zeros_like(g))
    return _up(((alpha * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True) * a).sum(1))


@pytest.mark.parametrize("name", ["gradcam", "hirescam", "layercam", "xgradcam", "gradcam_plus_plus"])
def test_gradient_cams_read_bn2_not_the_block_output(case, name):
    model, x, _, a, g = case
    with unchanged(model):
        got = getattr(salience, name)(model, x, TARGET, layer=model.layer4[-1].bn2)
    _close(got, _gradient_reference(name, a, g))
    assert all(m.inplace for m in model.modules() if hasattr(m, "inplace"))  # the user's flags as they were


def test_guided_gradcam_reads_bn2(case):
    model, x, _, a, g = case
    with unchanged(model):
        got = salience.guided_gradcam(model, x, TARGET, layer=model.layer4[-1].bn2, reduce=None)
    guided = salience.guided_backprop(model, x, TARGET, reduce=None)
    _close(got, guided * _gradient_reference("gradcam", a, g)[:, None])


def test_fused_layercam_reads_bn2(case):
    model, x, ref, a, g = case
    got = salience.layercam(model, x, TARGET, layer=[model.layer4[-1].bn2], gamma=2.0)
    cam = _gradient_reference("layercam", a, g)
    _close(got, torch.tanh(2.0 * cam / cam.amax()))


def _scores(ref: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return ref(inputs)[:, TARGET]


def test_scorecam_masks_with_bn2(case):
    model, x, ref, a, _ = case
    with unchanged(model):
        got = salience.scorecam(model, x, TARGET, layer=model.layer4[-1].bn2)
    up = F.interpolate(a, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]  # (K, H, W)
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    masks = torch.where(hi > lo, (up - lo) / (hi - lo).clamp(min=1e-30), torch.zeros_like(up))
    with torch.no_grad():  # w_k: the target's probability of x * H_k (the paper's)
        w = ref(x * masks[:, None]).softmax(1)[:, TARGET]
    _close(got, _up((w[:, None, None] * a[0]).sum(0, keepdim=True)))


def test_ablationcam_ablates_and_weighs_bn2(case):
    model, x, ref, a, _ = case
    with unchanged(model):
        got = salience.ablationcam(model, x, TARGET, layer=model.layer4[-1].bn2)
    k = a.shape[1]

    def zero_channel(m: nn.Module, i: object, o: Tensor) -> Tensor:
        o = o.repeat(k, 1, 1, 1)
        o[torch.arange(k), torch.arange(k)] = 0
        return o

    handle = ref.layer4[-1].bn2.register_forward_hook(zero_channel)
    try:  # ref's block adds its identity (1 row) to the k ablated rows: broadcast
        ablated = _scores(ref, x)
    finally:
        handle.remove()
    clean = _scores(ref, x)
    w = (clean - ablated) / clean  # (S - S_k) / S
    _close(got, _up((w[:, None, None] * a[0]).sum(0, keepdim=True)))


def test_eigencam_with_a_class_target_reads_bn2(case):
    """The registry's Eigen-CAM with a class target runs its pass on to the output: the layer's own output."""
    model, x, _, a, _ = case
    got = METHODS["eigencam"](model, x, TARGET, layer=model.layer4[-1].bn2)
    m = a[0].flatten(1).t().double()  # (h w, K)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = m @ vh[0]
    proj = -proj if proj.min().abs() > proj.max().abs() else proj
    want = F.interpolate(proj.reshape(1, 1, 2, 2).float(), size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)[:, 0]
    _close(got, want)
    _close(salience.eigencam(model, x, layer=model.layer4[-1].bn2), want)


def _passes(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    return calls


def test_default_layer_is_the_plain_capture_bit_for_bit_in_one_pass(case):
    model, x, _, _, _ = case
    model = copy.deepcopy(model)  # the pass counter's hook stays on this copy
    kept: list[Tensor] = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: kept.append(o))
    out = model(x.clone().requires_grad_(True))
    handle.remove()
    (g,) = torch.autograd.grad(out[:, TARGET].sum(), kept[0])
    want = upsample_maps(_gradcam_map(kept[0].detach(), g).clamp(min=0)[:, None], (SIZE, SIZE))[:, 0]
    calls = _passes(model)
    got = salience.gradcam(model, x, TARGET, layer=model.layer4)
    assert torch.equal(got, want)
    assert len(calls) == 1


def test_a_layer_changed_in_place_after_costs_no_more_pass(case):
    """Session 42: the capture copies the output's values when the layer returns and differentiates its gradient
    edge (session 41 ran the first call's pass again on a copy: two passes): one pass on every call."""
    model, x, _, a, g = case
    model = copy.deepcopy(model)
    calls = _passes(model)
    first = salience.gradcam(model, x, TARGET, layer=model.layer4[-1].bn2)
    assert len(calls) == 1
    calls.clear()
    again = salience.gradcam(model, x, TARGET, layer=model.layer4[-1].bn2)
    assert len(calls) == 1 and torch.equal(first, again)
    _close(again, _gradient_reference("gradcam", a, g))


def test_layer_gradient_is_the_gradient_wrt_bn2(case):
    """The engine's layer gradient (keras-vis's ``wrt_tensor``, the CAMs' ``G``): w.r.t. bn2's own output."""
    from salience._core.autograd import gradients
    from salience.targets import as_target

    model, x, _, a, g = case
    p = gradients(model, x, as_target(TARGET), layers=[model.layer4[-1].bn2])
    _close(p.layer_grads[0], g)
    _close(p.activations[0], a)
