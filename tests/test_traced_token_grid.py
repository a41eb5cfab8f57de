"""Tokens of a model without a stride == kernel patch embedding, read on the grid the model itself produced.

timm's TNT (its patches unfolded by ``nn.Unfold(16, stride=16)``, then a 7x7 stride-4 convolution inside each)
and PiT (a 16x16 stride-8 patch convolution, then convolutional pooling between stages: 27x27 -> 14x14 -> 7x7
at 224 px, a class token, and a distillation token in the distilled variant) got a default layer whose tokens
salience could not read ("cannot tell which are patches"): Grad-CAM with no ``layer=`` failed, and
``default_methods`` listed the CAMs anyway. The tokens are now read on the grid one of the model's convolutions,
poolings or unfoldings produced with 0, 1 or 2 cells fewer than the tokens (the rest: the prefix tokens before
them), when exactly one such reading exists; otherwise the default search has no default layer and
``default_methods`` leaves the CAMs out. The maps are checked against Grad-CAM written out by hand
(:mod:`hand_cams`) on the grid and prefix of timm's code, with each image's reference map varying over positions.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.methods import GUIDED_METHODS, LAYER_METHODS, default_methods
from salience.methods.gradcam import default_layer

from hand_cams import assert_each_varies, gradcam_by_hand, row_major

timm = pytest.importorskip("timm")


def _redraw_heads(net: nn.Module, seed: int) -> None:
    """Re-draw the classifier heads (``head``, ``head_dist``) from a seeded normal: at timm's init the ReLU'd map of
    PiT / TNT is all zero or constant for some images (a weighted sum negative everywhere); with seed 2 both images'
    reference maps vary over positions for the three models (asserted in the test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if name.startswith("head") and isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))


@pytest.mark.parametrize("arch, layer, prefix, side", [
    ("pit_ti_224", "transformers.2.blocks.3.norm1", 1, 7),            # class token + the 7x7 map of the 2nd pooling
    ("pit_ti_distilled_224", "transformers.2.blocks.3.norm1", 2, 7),  # class + distillation tokens + 7x7
    ("tnt_s_patch16_224", "blocks.11.norm_out", 1, 14),               # class token + the 14x14 unfolded patches
])
def test_default_layer_of_tnt_and_pit_reads_their_grid_and_equals_the_hand_computation(arch, layer, prefix, side):
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False).eval()
    _redraw_heads(net, 2)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    assert default_layer(net, x) == layer
    ref = gradcam_by_hand(net, x, layer, target, row_major(side, side, prefix))
    assert (ref.flatten(1).std(1) > 0).all(), "each image's reference map must vary over positions"
    cam = salience.gradcam(net, x, target)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    # guided Grad-CAM is left out on these GELU models (its rule is not defined for GELU: it refuses them)
    assert set(LAYER_METHODS) - set(GUIDED_METHODS) <= set(default_methods(net, x[:1]))


class _Pooled(nn.Module):
    """A toy transformer with no patch embedding: an overlapping strided stem (kernel 8, stride 4, padding 2: 8x8 on
    32x32) with a BatchNorm, ``prefix`` class-like tokens, a norm, one global attention, a head on token 0; with
    ``side_pool`` also a 5x13 adaptive pooling of the stem's map (65 cells), added to the tokens as a scalar."""

    def __init__(self, prefix: int = 2, side_pool: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 8, 4, 2), nn.BatchNorm2d(16))
        self.cls = nn.Parameter(torch.randn(1, prefix, 16))
        self.side = nn.AdaptiveAvgPool2d((5, 13)) if side_pool else None
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        f = self.stem(x)
        t = torch.cat([self.cls.expand(len(x), -1, -1), f.flatten(2).transpose(1, 2)], 1)
        if self.side is not None:
            t = t + self.side(f).mean((1, 2, 3))[:, None, None]
        t = self.norm(t)
        return self.head(self.attn(t, t, t, need_weights=False)[0][:, 0])


def test_tokens_after_an_overlapping_stem_are_read_on_its_grid():
    """66 tokens on 32x32: 2 prefix tokens + the stem's 8x8 map (no stride grid has 66 or 65 cells, 64 only after
    2 prefix tokens: refused before); Grad-CAM at the default equals the hand computation."""
    torch.manual_seed(0)
    net = _Pooled().train()  # train mode: the BatchNorm's running stats must come back untouched
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 4])
    assert default_layer(net, x) == "norm"
    cam = salience.gradcam(net, x, target)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.eval()
    cam = salience.gradcam(net, x, target)
    ref = gradcam_by_hand(net, x, "norm", target, row_major(8, 8, 2))
    assert (ref.flatten(1).std(1) > 0).all()
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_tokens_with_two_readings_on_the_models_grids_ask_for_grid_and_prefix_tokens():
    """66 tokens read as 2 + 8x8 (the stem) or 1 + 5x13 (the side pooling): ambiguous. The default layer stays the
    ViT rule's ``norm`` (so that ``grid=`` / ``prefix_tokens=`` without ``layer=`` apply there), Grad-CAM without
    them names both readings, ``default_methods`` leaves the CAMs out (it listed them, and each failed), and with
    the layout given Grad-CAM equals the hand computation."""
    torch.manual_seed(0)
    net = _Pooled(side_pool=True).eval()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 4])
    assert default_layer(net, x) == "norm"
    with pytest.raises(SalienceError, match=r"66 tokens.*cannot tell which are patches.*own maps fit several too "
                                            r"\(2 prefix token\(s\) \+ 8x8, 1 prefix token\(s\) \+ 5x13\)"):
        salience.gradcam(net, x, target)
    assert not set(LAYER_METHODS) & set(default_methods(net, x[:1]))
    assert set(LAYER_METHODS) - set(GUIDED_METHODS) <= set(default_methods(_Pooled().eval(), x[:1]))
    cam = salience.gradcam(net, x, target, grid=(8, 8), prefix_tokens=2)
    ref = gradcam_by_hand(net, x, "norm", target, row_major(8, 8, 2))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "hirescam", "layercam", "eigencam"])
def test_a_cam_traces_the_models_grids_once_per_call(method):
    """The tokens of ``_Pooled`` are read on the grid the model produces (one forward pass of zeros,
    ``traced_grids``). The trace was memoised only inside the default-layer search, so the CAM's layout ran it
    again: 4 forward passes of the model. Now one trace per call: the search's pass, the trace, the CAM's pass; with
    ``layer=`` the trace and the CAM's pass; with ``grid=`` / ``prefix_tokens=`` too, the CAM's pass alone."""
    torch.manual_seed(0)
    net = _Pooled().eval()
    x = torch.rand(2, 3, 32, 32)
    fn = getattr(salience, method)
    if method == "guided_gradcam":  # a model without ReLUs: the plain gradient, taken with unsupported="ignore"
        fn = functools.partial(fn, unsupported="ignore")
    count = [0]
    handle = net.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    try:
        for kwargs, passes in (({}, 3), ({"layer": "norm"}, 2), ({"layer": "norm", "grid": (8, 8), "prefix_tokens": 2}, 1)):
            count[0] = 0
            fn(net, x, **kwargs)
            assert count[0] == passes, (kwargs, count[0])
    finally:
        handle.remove()
