"""Grad-CAM++, HiResCAM, XGrad-CAM, LayerCAM and Eigen-CAM: pytorch-grad-cam before its scaling, the
papers' formulas written out, closed forms on a global-average-pooled linear head, several targets,
token layers, errors and the model left as it was."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError
from salience.methods import METHODS, TARGET_FREE_METHODS, apply_method, as_method

from conftest import unchanged
from nets import CamNet
from tiny_vit import torchvision_vit
from hand_cams import assert_each_varies


GRADIENT_CAMS = ["gradcam_plus_plus", "hirescam", "xgradcam", "layercam"]
PGC_NAMES = {"gradcam_plus_plus": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
             "layercam": "LayerCAM", "gradcam": "GradCAM"}
# Grad-CAM++'s weights depend on the score's scale (the paper's exp(S)); pytorch-grad-cam adds 1e-6 to
# their denominator 2 G^2 + S G^3. With the logits of a random resnet18 (|G| ~ 5e-3 at layer3) that eps
# changes the map by ~9 %; with the logits times 1000 (|G| ~ 5) it is below float32's resolution.
SCALE = 1e3


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    torchvision = pytest.importorskip("torchvision")  # only the torchvision cases skip without it
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def x64():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)  # resnet18: layer3 4 x 4, layer4 2 x 2


T = torch.tensor([3, 9])


def scaled_target(t):
    """The logit of class ``t[b]`` of each image, times SCALE (ours: ``(B,)`` from the output)."""
    return lambda out: SCALE * out[torch.arange(len(t)), t]


def pgc_raw(cls, model, layer, x, targets, reshape_transform=None):
    """pytorch-grad-cam's map before its min-max scaling: ``ReLU(get_cam_image(...))`` at the layer's
    resolution (the ReLU is its ``compute_cam_per_layer``'s), and its scaled, resized output."""
    with cls(model=model, target_layers=[layer], reshape_transform=reshape_transform) as cam:
        scaled = cam(input_tensor=x, targets=targets)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        g = cam.activations_and_grads.gradients
        grads = g[0].cpu().numpy() if g else None
        raw = cam.get_cam_image(x, layer, targets, acts, grads, False)
    return torch.from_numpy(raw), torch.from_numpy(scaled), acts


@pytest.mark.parametrize("name", GRADIENT_CAMS)
def test_equal_to_pytorch_grad_cam_before_its_scaling(name, resnet, x64):
    """On layer3, where the gradient varies over positions (after layer4 the head is a global average
    pool + linear, and HiResCAM = XGrad-CAM = Grad-CAM there: see the closed-form test)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    cls = getattr(pgc, PGC_NAMES[name])
    fn = getattr(salience, name)
    scale = SCALE if name == "gradcam_plus_plus" else 1.0
    targets = [(lambda o, c=int(c): scale * o[c]) for c in T]
    raw, scaled, _ = pgc_raw(cls, resnet, resnet.layer3, x64, targets)
    ours = fn(resnet, x64, scaled_target(T) if scale != 1 else T, layer="layer3", upsample=False, relu=False)
    tol = 2e-5 * float(raw.abs().max())  # float32 sums of 256 channels, numpy vs torch
    assert_each_varies(raw)
    torch.testing.assert_close(ours, raw, rtol=0, atol=tol)
    if name in ("hirescam", "xgradcam"):  # Grad-CAM++ and LayerCAM weigh ReLU outputs by weights >= 0
        assert (raw < 0).any() and (raw > 0).any()  # the ReLU below is not idle
    # Their output: ReLU, min-max scaled per image, OpenCV's bilinear resize = ours (ReLU, upsampled), scaled.
    full = fn(resnet, x64, scaled_target(T) if scale != 1 else T, layer=resnet.layer3)
    low = F.interpolate(raw.clamp(min=0)[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(full, low, rtol=0, atol=tol)
    torch.testing.assert_close(salience.normalize(full), scaled, rtol=0, atol=1e-4)


def _hooked(model, layer, x, score):
    """The layer's output A and dS/dA in float64, written out with a hook and torch.autograd."""
    kept = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(score(out).sum(), kept[0])
    return kept[0].detach().double(), g.double()


def test_gradcam_plus_plus_is_the_papers_formula_and_pytorch_grad_cams_eps_is_the_difference(resnet, x64):
    """Eq. 19 with the exponential: alpha = G^2 / (2 G^2 + sum_ab A_ab G^3), w_k = sum_ij alpha ReLU(G);
    on the plain logits pytorch-grad-cam's +1e-6 in the denominator moves the map."""
    a, g = _hooked(resnet, resnet.layer3, x64, lambda out: out[torch.arange(2), T])
    s = a.sum((2, 3), keepdim=True)

    def eq19(eps):
        den = 2 * g ** 2 + s * g ** 3 + eps
        alpha = torch.where(g != 0, g ** 2 / den, torch.zeros_like(g))
        return ((alpha * g.clamp(min=0)).sum((2, 3), keepdim=True) * a).sum(1).clamp(min=0)

    ours = salience.gradcam_plus_plus(resnet, x64, T, layer="layer3", upsample=False)
    peak = float(ours.abs().max())
    assert_each_varies(eq19(0.0))
    torch.testing.assert_close(ours.double(), eq19(0.0), rtol=0, atol=1e-5 * peak)
    # The peer's part (the closed form above runs without it).
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    theirs, _, _ = pgc_raw(pgc.GradCAMPlusPlus, resnet, resnet.layer3, x64, [ClassifierOutputTarget(int(c)) for c in T])
    theirs = theirs.clamp(min=0)
    assert float((theirs - ours).abs().max()) > 1e-2 * peak  # they differ here ...
    torch.testing.assert_close(theirs.double(), eq19(1e-6), rtol=0, atol=1e-5 * peak)  # ... by their eps


def test_closed_forms_on_a_global_average_pooled_linear_head():
    """dS/dA_kij = W_tk / (h w) everywhere (Draelos & Carin's argument): HiResCAM = Grad-CAM = XGrad-CAM =
    CAM / (h w) = sum_k W_tk A_k / (h w); LayerCAM = sum_k ReLU(W_tk) A_k / (h w); Grad-CAM++'s alpha is
    1 / (2 + S_k W_tk / (h w)), so w_k = h w ReLU(W_tk / (h w)) / (2 + S_k W_tk / (h w))."""
    torch.manual_seed(0)
    m = CamNet()
    x = torch.randn(3, 3, 5, 7)
    t = torch.tensor([0, 3, 2])
    with torch.no_grad():
        a = m.features(x)  # (B, K, h, w)
        w = m.head.weight[t][:, :, None, None] / 35  # (B, K, 1, 1) = dS/dA
        s = a.sum((2, 3), keepdim=True)
    cam = (w * a).sum(1)
    assert (cam < 0).any() and (cam > 0).any()
    kw = dict(layer="features", relu=False)
    assert_each_varies(cam)
    assert_each_varies(cam.clamp(min=0))
    assert_each_varies((w.clamp(min=0) * a).sum(1))
    for fn in (salience.hirescam, salience.xgradcam, salience.gradcam):
        torch.testing.assert_close(fn(m, x, t, **kw), cam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(salience.hirescam(m, x, t, layer="features"), cam.clamp(min=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(salience.layercam(m, x, t, **kw), (w.clamp(min=0) * a).sum(1), rtol=1e-5, atol=1e-6)
    pp = (35 * w.clamp(min=0) / (2 + s * w) * a).sum(1)
    assert_each_varies(pp)
    torch.testing.assert_close(salience.gradcam_plus_plus(m, x, t, **kw), pp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", GRADIENT_CAMS + ["layercam_fused"])
def test_several_targets_equal_one_at_a_time_and_batch_equals_single_images(name, small_cnn):
    torch.manual_seed(5)
    x = torch.randn(3, 3, 8, 8)
    kw = {"layer": ["features.2", "features.5"]} if name == "layercam_fused" else {"layer": "features.3"}
    fn = getattr(salience, name.replace("_fused", ""))
    tk = torch.tensor([[1, 0], [0, 3], [3, 2]])
    both = fn(small_cnn, x, tk, **kw)
    assert both.shape == (3, 2, 8, 8)
    for k in range(2):
        one = fn(small_cnn, x, tk[:, k], **kw)
        torch.testing.assert_close(both[:, k], one, rtol=1e-5, atol=1e-7)
        single = torch.cat([fn(small_cnn, x[i:i + 1], tk[i:i + 1, k], **kw) for i in range(3)])
        torch.testing.assert_close(one, single, rtol=1e-5, atol=1e-7)
    assert (both[:, 0] != both[:, 1]).any()


def test_several_targets_cost_one_forward_pass(small_cnn):
    calls = []
    handle = small_cnn.features.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        for name in GRADIENT_CAMS:
            calls.clear()
            getattr(salience, name)(small_cnn, torch.rand(2, 3, 8, 8), torch.tensor([[0, 1, 2], [3, 2, 1]]),
                                    layer="features.3")
            assert len(calls) == 1, name
        calls.clear()
        salience.layercam(small_cnn, torch.rand(2, 3, 8, 8), torch.tensor([[0, 1], [3, 2]]),
                          layer=["features.2", "features.5"])
        assert len(calls) == 1
    finally:
        handle.remove()


def test_layercam_fuses_layers_by_the_papers_eq_9_and_the_maximum(resnet, x64):
    """Each layer's LayerCAM (upsampled), tanh(gamma * M / max M) per image (Jiang et al. 2021, Eq. 9),
    fused by the element-wise maximum."""
    layers = ["layer2", "layer3", "layer4"]
    fused = salience.layercam(resnet, x64, T, layer=layers, gamma=2.0)
    parts = []
    for name in layers:
        m = salience.layercam(resnet, x64, T, layer=name)
        parts.append(torch.tanh(2.0 * m / m.amax((1, 2), keepdim=True)))
    expected = torch.stack(parts).amax(0)
    assert_each_varies(expected)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    winners = torch.stack(parts).argmax(0)
    assert len(winners.unique()) > 1  # more than one layer shows in the fused map
    with pytest.raises(SalienceError, match="gamma"):
        salience.layercam(resnet, x64, T, layer=layers, gamma=0)
    with pytest.raises(SalienceError, match="no layer"):
        salience.layercam(resnet, x64, T, layer=[])


def _vit_tokens_to_grid(t):
    """pytorch-grad-cam's reshape_transform for the fixture's ViT (32 px, patch 8): class token off, 4 x 4."""
    return t[:, 1:, :].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", GRADIENT_CAMS + ["eigencam"])
def test_token_layer_of_a_vit_equals_pytorch_grad_cam_with_its_reshape(name):
    """The default layer of torchvision's ViT (the last block's ln_1, tokens (B, 17, 16)); pytorch-grad-cam
    is given the same layer and a reshape_transform that does what salience infers from the patch embedding."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    vit = torchvision_vit()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32)
    t = torch.tensor([1, 4])
    layer = vit.encoder.layers[-1].ln_1
    cls = getattr(pgc, "EigenCAM" if name == "eigencam" else PGC_NAMES[name])
    targets = None if name == "eigencam" else [(lambda o, c=int(c): SCALE * o[c]) for c in t]
    raw, _, acts = pgc_raw(cls, vit, layer, x, targets, reshape_transform=_vit_tokens_to_grid)
    if name == "eigencam":
        ours = salience.eigencam(vit, x, upsample=False, center=True)
        raw = raw * _our_sign(raw)[:, None, None]
    else:
        ours = getattr(salience, name)(vit, x, scaled_target(t), upsample=False, relu=False)
    assert ours.shape == (2, 4, 4)
    assert_each_varies(raw)
    torch.testing.assert_close(ours, raw, rtol=0, atol=2e-5 * float(raw.abs().max()))


# --------------------------------------------------------------------------------- Eigen-CAM


def _our_sign(raw):
    """+1 / -1 per image: the sign that makes the largest magnitude of a projection ``(B, h, w)`` positive."""
    flat = raw.flatten(1)
    return torch.where(flat.amin(1).abs() > flat.amax(1).abs(), -1.0, 1.0)


def test_eigencam_centered_equals_pytorch_grad_cam_up_to_the_svds_sign(resnet):
    """pytorch-grad-cam centres the activations and takes numpy's first right-singular vector with whatever
    sign LAPACK gives, then its ReLU keeps one side; salience makes the largest magnitude positive. On
    resnet18's layer1 (16 x 16 positions, 64 channels) LAPACK's sign is the other one on some images."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)[:2]
    raw, _, _ = pgc_raw(pgc.EigenCAM, resnet, resnet.layer1, x, None)
    sign = _our_sign(raw)  # here (numpy 2, OpenBLAS) [1, -1]: LAPACK's sign is the other one on image 1
    ours = salience.eigencam(resnet, x, layer="layer1", upsample=False, center=True)
    assert_each_varies(raw)
    torch.testing.assert_close(ours, raw * sign[:, None, None], rtol=0, atol=2e-6 * float(raw.abs().max()))
    flipped = sign < 0
    if flipped.any():  # their ReLU keeps the smaller side of the map there
        diff = (ours[flipped].clamp(min=0) - raw[flipped].clamp(min=0)).abs().amax()
        assert float(diff) > 0.1 * float(raw.abs().max())


def test_eigencam_default_is_the_papers_uncentered_projection(resnet, x64):
    """Muhammad & Yeasin: the activations M (h w, K) times their first right-singular vector, written out
    with torch.linalg.svd in float64 (salience takes an eigendecomposition of the smaller Gram matrix);
    non-negative on ReLU outputs."""
    for layer in ("layer3",):
        kept = []
        handle = resnet.get_submodule(layer).register_forward_hook(lambda mod, i, o: kept.append(o))
        try:
            with torch.no_grad():
                resnet(x64)
        finally:
            handle.remove()
        m = kept[0].flatten(2).transpose(1, 2).double()  # (B, hw, K)
        v = torch.linalg.svd(m, full_matrices=False)[2][:, 0]  # (B, K)
        expected = (m @ v[..., None])[..., 0].unflatten(1, kept[0].shape[-2:])
        expected = expected * _our_sign(expected)[:, None, None]
        ours = salience.eigencam(resnet, x64, layer=layer, upsample=False)
        assert_each_varies(expected)
        torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
        assert (ours >= 0).all()
    up = salience.eigencam(resnet, x64, layer="layer3")
    torch.testing.assert_close(up, F.interpolate(ours[:, None], size=(64, 64), mode="bilinear",
                                                 align_corners=False)[:, 0])


def test_eigencam_runs_one_forward_in_inference_mode_up_to_the_layer(small_cnn):
    seen = []
    h1 = small_cnn.features.register_forward_hook(lambda m, i, o: seen.append(("features", torch.is_inference_mode_enabled())))
    h2 = small_cnn.head.register_forward_hook(lambda m, i, o: seen.append(("head", None)))
    try:
        salience.eigencam(small_cnn, torch.rand(2, 3, 8, 8), layer="features")
    finally:
        h1.remove()
        h2.remove()
    assert seen == [("features", True)]  # one pass, no graph, the head never ran


def test_eigencam_takes_no_target_and_the_registry_gives_its_map_for_each(small_cnn):
    """salience.eigencam refuses a target; its registry entry (and as_method of it, or of a partial of
    it) takes the target like every method and gives the one map for each of K targets."""
    import functools
    import inspect

    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(SalienceError, match="eigencam takes no target"):
        salience.eigencam(small_cnn, x, 1)
    assert TARGET_FREE_METHODS == {"eigencam"}
    assert list(inspect.signature(salience.eigencam).parameters)[:4] == ["model", "x", "target", "layer"]
    adapted = METHODS["eigencam"]
    assert as_method(adapted) is adapted and as_method(salience.gradcam) is salience.gradcam
    assert list(inspect.signature(adapted).parameters) == list(inspect.signature(salience.eigencam).parameters)
    one = salience.eigencam(small_cnn, x, layer="features.3")
    for fn in (adapted, as_method(salience.eigencam)):
        torch.testing.assert_close(fn(small_cnn, x, torch.tensor([0, 1]), layer="features.3"), one)
        torch.testing.assert_close(fn(small_cnn, x, layer="features.3"), one)
    part = as_method(functools.partial(salience.eigencam, layer="features.3"))
    k = part(small_cnn, x, torch.tensor([[0, 1, 2], [1, 2, 3]]))
    assert k.shape == (2, 3, 8, 8) and all(torch.equal(k[:, j], one) for j in range(3))
    torch.testing.assert_close(apply_method(salience.eigencam, small_cnn, x, 1, layer="features.3"), one)
    with pytest.raises(SalienceError):  # a target that is not one: still an error
        adapted(small_cnn, x, "cat")
    with pytest.raises(SalienceError, match=r"Eigen-CAM needs a layer whose output is a map"):
        adapted(small_cnn, x, 0, layer="drop")  # a layer without channels, named for Eigen-CAM


# A wrong target (an issue's "Real models"): the map does not depend on it, but the registry entry
# refuses it with the error every other method gives. SmallCNN has 4 outputs; the batch is 2.
WRONG_TARGETS = {
    "out of range": (5000, r"^target class 5000 is out of range for a model with 4 outputs \(valid: 0\.\.3\)$"),
    "negative": (-1, r"^target class -1 is out of range for a model with 4 outputs"),
    "per image out of range": (torch.tensor([2, 4]), r"^target class 4 is out of range"),
    "one of K out of range": (torch.tensor([[0, 1], [2, 9]]), r"^target class 9 is out of range"),
    "class set out of range": (salience.targets.multilabel([1, 7]), r"^target class 7 is out of range"),
    "regression output out of range": (salience.targets.regression(4), r"^regression output 4 is out of range"),
    "per image, wrong length": ([0, 1, 2], r"^got 3 target classes for a batch of 2 images"),
    "K per image, wrong length": (torch.tensor([[0, 1], [1, 2], [2, 3]]), r"B = 2 \(the batch\)"),
}


@pytest.mark.parametrize("case", list(WRONG_TARGETS))
def test_eigencam_refuses_a_wrong_target_as_gradcam_does(case, small_cnn):
    """Through the registry, ``as_method`` of a partial, and SmoothGrad over Eigen-CAM; the message is
    gradcam's word for word, and the model comes back as it was."""
    import functools

    target, words = WRONG_TARGETS[case]
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(SalienceError, match=words) as ref:
        salience.gradcam(small_cnn, x, target, layer="features.3")
    _mixed_state(small_cnn)
    calls = [METHODS["eigencam"], as_method(functools.partial(salience.eigencam, layer="features.3")),
             functools.partial(salience.smoothgrad, method=salience.eigencam, samples=3, chunk=2)]
    for fn in calls:
        with unchanged(small_cnn), pytest.raises(SalienceError) as got:
            fn(small_cnn, x, target)
        assert str(got.value) == str(ref.value)
    with pytest.raises(SalienceError, match="eigencam takes no target"):  # the function itself takes none
        salience.eigencam(small_cnn, x, target)


def test_eigencam_checks_a_class_target_on_the_output_of_its_own_pass(small_cnn):
    """A class target: the one pass runs on past the layer to the output (no second pass); none, the
    predicted class or a function of the output: it stops at the layer as before. A valid target gives
    the map of no target."""
    x = torch.rand(2, 3, 8, 8)
    one = salience.eigencam(small_cnn, x, layer="features.3")
    seen = []
    h1 = small_cnn.register_forward_pre_hook(lambda m, i: seen.append("model"))
    h2 = small_cnn.head.register_forward_hook(lambda m, i, o: seen.append("head"))
    try:
        for target, ran in ((3, ["model", "head"]), (torch.tensor([0, 3]), ["model", "head"]),
                            (salience.targets.multilabel([[0, 1], [2, 3]]), ["model", "head"]),
                            (salience.targets.regression(0), ["model", "head"]),
                            (None, ["model"]), (salience.targets.predicted(), ["model"]),
                            (lambda out: out[:, 7], ["model"])):  # a function: not called (the map needs no score)
            seen.clear()
            with unchanged(small_cnn):
                torch.testing.assert_close(METHODS["eigencam"](small_cnn, x, target, layer="features.3"), one,
                                           rtol=0, atol=0)
            assert seen == ran, target
        seen.clear()
        k = METHODS["eigencam"](small_cnn, x, torch.tensor([[0, 1, 3], [3, 2, 1]]), layer="features.3")
        assert seen == ["model", "head"] and k.shape == (2, 3, 8, 8)
        assert all(torch.equal(k[:, j], one) for j in range(3))
    finally:
        h1.remove()
        h2.remove()


class _ScriptedHead(nn.Module):
    """A Python model whose head is TorchScript: Eigen-CAM reads a Python layer before it."""

    def __init__(self, net):
        super().__init__()
        self.features = net.features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.head = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4)))

    def forward(self, x):
        return self.head(self.features(x))


def test_eigencam_checks_a_target_through_a_torchscript_part(small_cnn):
    model = _ScriptedHead(small_cnn).eval()
    x = torch.rand(2, 3, 8, 8)
    one = salience.eigencam(model, x, layer="features")
    with unchanged(model):
        torch.testing.assert_close(METHODS["eigencam"](model, x, 3, layer="features"), one, rtol=0, atol=0)
        with pytest.raises(SalienceError, match=r"^target class 4 is out of range for a model with 4 outputs"):
            METHODS["eigencam"](model, x, 4, layer="features")


# --------------------------------------------------------------------------------- errors, hygiene


ALL = GRADIENT_CAMS + ["eigencam"]


@pytest.mark.parametrize("name", ALL)
def test_bad_input_says_what_to_do(name, small_cnn):
    fn = getattr(salience, name)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(SalienceError, match=r"\(B, K, h, w\).*\(2, 4\)"):
        fn(small_cnn, x, layer="head")  # a layer without channels
    with pytest.raises(SalienceError, match="did you mean"):
        fn(small_cnn, x, layer="feature.3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(small_cnn)
    with pytest.raises(SalienceError, match="TorchScript"):
        fn(scripted, x)


def _mixed_state(m):
    m.train()
    m.head.eval()  # a mixed state must come back mixed
    m.features[0].weight.requires_grad_(False)
    m.head.weight.grad = torch.ones_like(m.head.weight)


@pytest.mark.parametrize("name", ALL)
def test_model_unchanged_after_success_exception_and_interrupt(name, small_cnn):
    fn = getattr(salience, name)
    _mixed_state(small_cnn)
    x = torch.rand(2, 3, 8, 8)
    with unchanged(small_cnn):
        fn(small_cnn, x)
        fn(small_cnn, x, layer="features.2")
        if name != "eigencam":
            fn(small_cnn, x, [[0, 1], [2, 3]])
            with pytest.raises(KeyboardInterrupt):
                fn(small_cnn, x, lambda out: (_ for _ in ()).throw(KeyboardInterrupt()))
        handle = small_cnn.features[1].register_forward_hook(lambda m, i, o: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            with pytest.raises(KeyboardInterrupt):
                fn(small_cnn, x)
        finally:
            handle.remove()
    bn = small_cnn.features[1]
    assert small_cnn.training and bn.training and not small_cnn.head.training


def test_registered_and_exported():
    for name in ALL:  # Eigen-CAM's entry is its adapter to the registry's contract (as_method)
        assert salience.METHODS[name] is as_method(getattr(salience, name)) and name in salience.__all__
        assert getattr(salience.METHODS[name], "adapts", getattr(salience, name)) is getattr(salience, name)
