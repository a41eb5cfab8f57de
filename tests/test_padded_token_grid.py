"""Token grids of inputs that are not a whole number of patches (small random configs, no download).

timm's ``dynamic_img_pad=True`` pads a 33x45 input to 40x48 before its 8-pixel patch convolution: a 5x6 grid
(ceil), not the convolution's 4x5 on the unpadded input (floor). The 31 tokens are a class token and 30 patches;
read on the floor grid they were 11 "prefix" tokens and 20 patches, a wrong map with no error. Without padding
(Hugging Face ViT with ``interpolate_pos_encoding``) the floor grid stays. A model that pads without saying so is
read on the grid whose prefix is a few tokens, and refused where both grids read so.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies
from test_gradcam_transformers import reference_cam, tokens_to_grid
from tiny_vit import Block

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

logging.getLogger("timm").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
           dynamic_img_size=True, dynamic_img_pad=True)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(2, 3, 33, 45)


@pytest.mark.parametrize("build, prefix", [
    (lambda: VisionTransformer(**VIT), 1),
    (lambda: VisionTransformerDistilled(**VIT), 2),
    (lambda: VisionTransformer(**VIT, reg_tokens=4, no_embed_class=True), 5),
], ids=["vit", "deit_distilled", "registers"])
def test_timm_dynamic_img_pad_reads_the_padded_grid(x, build, prefix):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        assert model.forward_features(x).shape[1] == prefix + 5 * 6
    target = torch.tensor([0, 4])
    with unchanged(model):
        cam = salience.gradcam(model, x, target)
    ref = reference_cam(model, x, model.blocks[1].norm1, target, tokens_to_grid(prefix, 5, 6))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)
    same = salience.gradcam(model, x, target, grid=(5, 6), prefix_tokens=prefix)
    torch.testing.assert_close(same, cam, rtol=0, atol=0)
    torch.testing.assert_close(salience.gradcam(model, x, target, grid=(5, 6)), cam, rtol=0, atol=0)
    assert salience.gradcam(model, x, target, upsample=False).shape == (2, 5, 6)
    assert f"{prefix} prefix token(s) + a 5x6 grid" in describe_default_layer(model, x)


def test_timm_without_padding_keeps_the_floor_grid():
    torch.manual_seed(0)
    model = VisionTransformer(**{**VIT, "dynamic_img_pad": False}).eval()
    x = torch.rand(1, 3, 32, 48)
    cam = salience.gradcam(model, x, 2)
    ref = reference_cam(model, x, model.blocks[1].norm1, torch.tensor([2]), tokens_to_grid(1, 4, 6))
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)


class _Logits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).logits


class _Interpolated(nn.Module):
    """Hugging Face ViT called with ``interpolate_pos_encoding=True``: any size, no padding (floor grid)."""

    def __init__(self):
        super().__init__()
        config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)
        self.m = transformers.ViTForImageClassification(config)

    def forward(self, x):
        return self.m(x, interpolate_pos_encoding=True).logits


def test_hf_vit_interpolate_pos_encoding_keeps_the_floor_grid(x):
    torch.manual_seed(0)
    model = _Interpolated().eval()
    cam = salience.gradcam(model, x, torch.tensor([1, 0]))
    norm = dict(model.named_modules())[default_layer(model, x)]
    ref = reference_cam(model, x, norm, torch.tensor([1, 0]), tokens_to_grid(1, 4, 5))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)


class _SilentPad(nn.Module):
    """Pads its input to whole 8-pixel patches (as timm's ``dynamic_img_pad``, with no attribute saying so),
    then ``prefix`` tokens before the patches."""

    def __init__(self, prefix=1):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.prefix = nn.Parameter(torch.randn(1, prefix, 16))
        self.blocks = nn.Sequential(Block(16, 2), Block(16, 2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.pad(x, (0, -x.shape[-1] % 8, 0, -x.shape[-2] % 8))
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), self.embed(x).flatten(2).transpose(1, 2)], 1)
        return self.head(self.blocks(t)[:, 0])


def test_a_model_that_pads_without_saying_is_read_on_the_grid_with_few_prefix_tokens(x):
    torch.manual_seed(0)
    model = _SilentPad().eval()  # 31 tokens: 1 + 5x6 (padded) or 11 + 4x5 (floor): 11 is no plausible prefix
    cam = salience.gradcam(model, x, 1, layer="blocks.1.norm1")
    ref = reference_cam(model, x, model.blocks[1].norm1, torch.tensor([1, 1]), tokens_to_grid(1, 5, 6))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)


def test_both_grids_plausible_and_the_model_silent_is_refused():
    torch.manual_seed(0)
    model = _SilentPad().eval()
    x = torch.rand(1, 3, 16, 20)  # 2x3 padded + 1 = 7 tokens, or 2x2 floor + 3
    with pytest.raises(SalienceError, match=r"grid=\(2, 2\), prefix_tokens=3.*grid=\(2, 3\), prefix_tokens=1"):
        salience.gradcam(model, x, 1, layer="blocks.1.norm1")
    with pytest.raises(SalienceError, match=r"prefix_tokens alone settles it: prefix_tokens=3 .* or prefix_tokens=1"):
        salience.gradcam(model, x, 1, layer="blocks.1.norm1")  # it did not say so
    cam = salience.gradcam(model, x, 1, layer="blocks.1.norm1", grid=(2, 3), prefix_tokens=1, upsample=False)
    ref = reference_cam(model, x, model.blocks[1].norm1, torch.tensor([1]), tokens_to_grid(1, 2, 3))
    assert cam.shape == (1, 2, 3)
    torch.testing.assert_close(salience.gradcam(model, x, 1, layer="blocks.1.norm1", grid=(2, 3), prefix_tokens=1),
                               ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(salience.gradcam(model, x, 1, layer="blocks.1.norm1", prefix_tokens=1), ref,
                               rtol=1e-5, atol=1e-6)


def test_other_cams_and_guided_gradcam_read_the_padded_grid(x):
    torch.manual_seed(0)
    model = VisionTransformer(**VIT).eval()
    for method in (salience.layercam, salience.gradcam_plus_plus):
        torch.testing.assert_close(method(model, x, 1), method(model, x, 1, grid=(5, 6), prefix_tokens=1),
                                   rtol=0, atol=0)
    guided = salience.guided_gradcam(model, x, 1, unsupported="ignore")
    explicit = salience.guided_gradcam(model, x, 1, unsupported="ignore", grid=(5, 6), prefix_tokens=1)
    torch.testing.assert_close(guided, explicit, rtol=0, atol=0)


def test_hf_swin_pads_its_input_so_its_last_norm_is_on_the_padded_grid():
    """Hugging Face Swin pads the input to whole patches (``maybe_pad``): 34x46 -> 9x12 patches of 4, merged to
    5x6 in the second stage; the floor grid (8x11, merged 4x6) fits no stage's tokens."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=2, num_labels=3)
    model = _Logits(transformers.SwinForImageClassification(config)).eval()
    x = torch.rand(1, 3, 34, 46)
    assert default_layer(model, x) == "m.swin.layernorm"
    cam = salience.gradcam(model, x, 1)
    ref = reference_cam(model, x, model.m.swin.layernorm, torch.tensor([1]), tokens_to_grid(0, 5, 6))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-6)


class _SaysPadsButDoesNot(nn.Module):
    """Its patch embedding says ``dynamic_img_pad=True`` (as timm's ``PatchEmbed``), its forward does not pad."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Module()
        self.embed.proj = nn.Conv2d(3, 16, 8, stride=8)
        self.embed.dynamic_img_pad = True
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.Sequential(Block(16, 2), Block(16, 2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed.proj(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1))[:, 0])


def test_a_model_that_says_it_pads_but_whose_tokens_fit_only_the_floor_grid_is_refused_naming_grid(x):
    """1 + 4x5 = 21 tokens on the 33x45 input, the said padding's grid 5x6 = 30: the refusal said only "fewer than
    the 5x6 = 30 patches of the grid", not that the model's word is what chose that grid nor which grid fits."""
    torch.manual_seed(0)
    model = _SaysPadsButDoesNot().eval()
    with pytest.raises(SalienceError, match=r"says it pads.*dynamic_img_pad=True.*pass grid=\(4, 5\), prefix_tokens=1"):
        salience.gradcam(model, x, 1, layer="blocks.1.norm1")
    with pytest.raises(SalienceError, match=r"prefix_tokens=1, which the tokens do not fit.*pass grid=\(4, 5\)"):
        salience.gradcam(model, x, 1, layer="blocks.1.norm1", prefix_tokens=1)
    ref = reference_cam(model, x, model.blocks[1].norm1, torch.tensor([1, 1]), tokens_to_grid(1, 4, 5))
    assert_each_varies(ref)
    torch.testing.assert_close(salience.gradcam(model, x, 1, layer="blocks.1.norm1", grid=(4, 5), prefix_tokens=1),
                               ref, rtol=1e-5, atol=1e-6)


def test_both_grids_fit_only_after_many_prefix_tokens_and_the_model_silent_is_refused(x):
    """9 + 5x6 = 39 tokens (padded, 9 prefix tokens) or 19 + 4x5 (floor): neither prefix plausible, and the floor
    grid was taken with no word (a wrong map)."""
    torch.manual_seed(0)
    model = _SilentPad(prefix=9).eval()
    with pytest.raises(SalienceError, match=r"grid=\(4, 5\), prefix_tokens=19 .* or grid=\(5, 6\), prefix_tokens=9"):
        salience.gradcam(model, x, 1, layer="blocks.0.norm1")
    ref = reference_cam(model, x, model.blocks[0].norm1, torch.tensor([1, 1]), tokens_to_grid(9, 5, 6))
    assert_each_varies(ref)
    torch.testing.assert_close(salience.gradcam(model, x, 1, layer="blocks.0.norm1", prefix_tokens=9), ref,
                               rtol=1e-5, atol=1e-6)
