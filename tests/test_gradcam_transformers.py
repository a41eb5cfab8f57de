"""Grad-CAM on transformers: token layers (ViT), channels-last maps (Swin, ConvNeXt), default layers,
``grid=`` / ``prefix_tokens=``, against hand-written references (hooks + reshape + the formula)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies
from tiny_vit import TinyViT, torchvision_vit

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlockConfig, ConvNeXt  # noqa: E402
from torchvision.models.swin_transformer import SwinTransformer  # noqa: E402


@pytest.fixture(scope="module")
def vit():
    return torchvision_vit()


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=5).eval()


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                    num_classes=5).eval()


@pytest.fixture(scope="module")
def x32():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)


def reference_cam(model, x, layer, target, to_grid):
    """Grad-CAM written out: a hook keeps the layer's output, one backward of the target's score,
    ``to_grid`` turns output and gradient into (B, K, h, w), ReLU(sum_k mean_ij(G_k) A_k), bilinear."""
    kept = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        xg = x.clone().requires_grad_(True)
        out = model(xg)
    finally:
        handle.remove()
    act = kept[0]
    (grad,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), act)
    a, g = to_grid(act.detach()), to_grid(grad)
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp(min=0)
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def tokens_to_grid(prefix, h, w):
    return lambda t: t[:, prefix:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 3, 1, 2)


def test_vit_default_layer_is_ln_1_of_the_last_block(vit, x32):
    assert default_layer(vit, x32) == "encoder.layers.encoder_layer_1.ln_1"
    said = describe_default_layer(vit, x32)
    assert "encoder_layer_1.ln_1" in said and "1 prefix token(s) + a 4x4 grid" in said and "class token" in said


def test_vit_patch_tokens_get_no_gradient_after_the_last_attention(vit, x32):
    """Why not the encoder's output: only the class token reaches the head, so the patch tokens'
    gradient there is exactly zero (and Grad-CAM's weights with it); before the last attention it is not."""
    kept = {}
    hooks = [vit.encoder.ln.register_forward_hook(lambda m, i, o: kept.__setitem__("out", o)),
             vit.encoder.layers[-1].ln_1.register_forward_hook(lambda m, i, o: kept.__setitem__("ln_1", o))]
    try:
        score = vit(x32.clone().requires_grad_(True))[:, 2].sum()
    finally:
        for h in hooks:
            h.remove()
    g_out, g_ln1 = torch.autograd.grad(score, [kept["out"], kept["ln_1"]])
    assert g_out[:, 0].abs().sum() > 0 and torch.equal(g_out[:, 1:], torch.zeros_like(g_out[:, 1:]))
    assert g_ln1[:, 1:].abs().amax() > 1e-3
    cam = salience.gradcam(vit, x32, 2, layer="encoder.ln")
    assert torch.equal(cam, torch.zeros_like(cam))


def test_vit_gradcam_equals_reference(vit, x32):
    target = torch.tensor([1, 3])
    with unchanged(vit):
        cam = salience.gradcam(vit, x32, target)
    ref = reference_cam(vit, x32, vit.encoder.layers[-1].ln_1, target, tokens_to_grid(1, 4, 4))
    assert cam.shape == (2, 32, 32) and cam.abs().sum() > 0
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)
    same = salience.gradcam(vit, x32, target, grid=(4, 4), prefix_tokens=1)
    torch.testing.assert_close(same, cam, rtol=0, atol=0)
    several = salience.gradcam(vit, x32, torch.tensor([[1, 4], [3, 0]]))
    torch.testing.assert_close(several[:, 0], cam)


def test_non_square_input_and_register_tokens():
    torch.manual_seed(2)
    model = TinyViT(size=(24, 40), prefix=2).eval()
    x = torch.rand(2, 3, 24, 40)
    assert default_layer(model, x) == "blocks.1.norm1"
    cam = salience.gradcam(model, x, 4)
    ref = reference_cam(model, x, model.blocks[1].norm1, torch.tensor([4, 4]), tokens_to_grid(2, 3, 5))
    assert cam.shape == (2, 24, 40) and cam.abs().sum() > 0
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)
    low = salience.gradcam(model, x, 4, upsample=False)
    assert low.shape == (2, 3, 5)


def test_grid_and_prefix_tokens_when_there_is_no_patch_conv():
    torch.manual_seed(3)
    model = TinyViT(size=(24, 40), prefix=1, conv=False).eval()
    x = torch.rand(1, 3, 24, 40)
    with unchanged(model):
        with pytest.raises(SalienceError, match=r"grid=\(h, w\).*prefix_tokens=k"):
            salience.gradcam(model, x, 0)
    ref = reference_cam(model, x, model.blocks[1].norm1, torch.tensor([0]), tokens_to_grid(1, 3, 5))
    for kw in ({"grid": (3, 5)}, {"prefix_tokens": 1}, {"grid": (3, 5), "prefix_tokens": 1}):
        torch.testing.assert_close(salience.gradcam(model, x, 0, **kw), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, says", [
    ({"grid": (5, 5)}, r"17 tokens, fewer than the 5x5 = 25 patches of the grid; pass grid=\(h, w\)"),
    ({"grid": (4, 4), "prefix_tokens": 2}, r"4x4 grid of patches and 2 prefix token\(s\) make 18"),
    ({"grid": (4,)}, r"grid must be \(h, w\), two positive ints"),
    ({"grid": (4, 0)}, r"grid must be \(h, w\)"),
    ({"prefix_tokens": -1}, r"prefix_tokens must be a non-negative int"),
])
def test_bad_grid_says_what_to_pass(vit, x32, kw, says):
    with unchanged(vit):
        with pytest.raises(SalienceError, match=says):
            salience.gradcam(vit, x32, 0, **kw)


def test_swin_default_layer_is_the_channels_last_norm(swin, x32):
    assert default_layer(swin, x32) == "norm"
    assert "channels-last (B, h, w, K)" in describe_default_layer(swin, x32)
    target = torch.tensor([0, 3])  # each image's map varies (class 2's is 0 on the second)
    with unchanged(swin):
        cam = salience.gradcam(swin, x32, target)
    ref = reference_cam(swin, x32, swin.norm, target, nhwc)
    low = salience.gradcam(swin, x32, target, upsample=False)
    assert low.shape == (2, 4, 4)
    assert_each_varies(low)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)
    # a channels-last stage given by name, and grid= deciding the layout
    stage = salience.gradcam(swin, x32, target, layer="features.3")
    torch.testing.assert_close(stage, reference_cam(swin, x32, swin.features[3], target, nhwc), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(salience.gradcam(swin, x32, target, layer="features.3", grid=(4, 4)), stage)


def test_convnext_default_layer_is_the_last_stage_and_inner_norms_are_channels_last(convnext):
    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 64)
    assert default_layer(convnext, x) == "features"  # the same tensor as the last stage, features.5
    target = torch.tensor([1, 4])
    with unchanged(convnext):
        cam = salience.gradcam(convnext, x, target)
    low = salience.gradcam(convnext, x, target, upsample=False)
    assert low.shape == (2, 4, 4)
    assert_each_varies(low)
    ref = reference_cam(convnext, x, convnext.features[5], target, lambda t: t)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)
    norm = convnext.features[5][0].block[2]  # the LayerNorm inside the block: (B, h, w, C)
    inner = salience.gradcam(convnext, x, target, layer=norm)
    ref = reference_cam(convnext, x, norm, target, nhwc)
    assert_each_varies(ref)
    # the map is ~1e-9: an absolute 1e-6 passed any map; the tolerance is relative to it
    torch.testing.assert_close(inner, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # on 32 pixels the last stage is 2x2; on 16 it is 1x1, and the last 2x2 map is preferred, not a 1x1
    # channels-last map read the wrong way round: since session 52 the stage that map comes out of
    # (features.3), not the next downsampling's LayerNorm2d inside features.4 (the same 2x2 map, normalized)
    assert default_layer(convnext, x[:, :, :32, :32]) == "features"
    assert default_layer(convnext, x[:, :, :16, :16]) == "features.3"


def test_guided_gradcam_takes_grid_and_prefix_tokens(vit, x32):
    with unchanged(vit):
        g = salience.guided_gradcam(vit, x32, 1, unsupported="ignore", grid=(4, 4), prefix_tokens=1)
    assert g.shape == (2, 32, 32) and g.abs().sum() > 0
    with pytest.raises(SalienceError, match="5x5 = 25 patches"):
        salience.guided_gradcam(vit, x32, 1, unsupported="ignore", grid=(5, 5))


def test_a_layer_that_is_no_map_says_so(vit, x32):
    with pytest.raises(SalienceError, match=r"gives shape \(2, 5\).*transformer block's norm"):
        salience.gradcam(vit, x32, 0, layer="heads")


def test_a_layer_that_returns_a_tuple_gives_its_first_tensor(vit, x32):
    """torchvision's ``self_attention`` (``nn.MultiheadAttention``) returns ``(output, weights)``, as Hugging
    Face's blocks return ``(hidden_states, weights)``: a CAM reads the first element (it refused every
    tuple before), and Grad-CAM there equals the hand computation on the attention's output."""
    layer = "encoder.layers.encoder_layer_0.self_attention"  # the last one's patch tokens get no gradient
    mha = vit.get_submodule(layer)
    target = torch.tensor([4, 3])  # each image's map varies (class 1's is 0 on both)
    with unchanged(vit):
        cam = salience.gradcam(vit, x32, target, layer=layer)
    held = []  # the hand computation: the first element of its output, its gradient
    handle = mha.register_forward_hook(lambda m, i, o: held.append(o[0]))
    try:
        out = vit(x32.clone().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[torch.arange(2), target].sum(), held[0])
    to_grid = tokens_to_grid(1, 4, 4)
    a, g = to_grid(held[0].detach()), to_grid(grad)
    ref = F.interpolate((g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp(min=0)[:, None], size=(32, 32),
                        mode="bilinear", align_corners=False)[:, 0]
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    for name in ("eigencam", "scorecam", "ablationcam", "layercam"):
        assert salience.METHODS[name](vit, x32, 0, layer=layer).shape == (2, 32, 32)


class _Pair(nn.Module):
    """Returns ``(None, x)``: a tuple whose first element is not a tensor."""

    def forward(self, t):
        return None, t


class _PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pair, self.head = nn.Conv2d(3, 4, 3, padding=1), _Pair(), nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.pair(self.conv(x))[1].mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["gradcam", "eigencam", "scorecam", "layercam"])
def test_a_layer_that_returns_no_tensor_first_says_what_it_returned(x32, name):
    """A layer whose output is no tensor nor a tuple led by one: it was called, and the error said it "was not
    called in the forward pass (or returned no tensor)", naming the layer by its repr (many lines). It says what
    the layer returned, by the layer's name."""
    torch.manual_seed(0)
    net = _PairNet().eval()
    for given in ("pair", net.pair):
        with unchanged(net), pytest.raises(SalienceError, match=r"^layer 'pair' returned a tuple of length 2 "
                                                             r"\(NoneType, tensor\), not a tensor"):
            salience.METHODS[name](net, x32, 0, layer=given)
