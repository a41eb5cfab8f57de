"""CAMs on token models without a patch-embedding convolution: LeViT (timm ``levit_128s``, Hugging
Face ``LevitForImageClassification``; random weights, no download). Their stem is a stack of strided
convolutions, then tokens that attention stages subsample (14x14 -> 7x7 -> 4x4 at 224 px), in
row-major order (timm and Hugging Face: ``flatten(2).transpose(1, 2)`` after the stem,
``view(B, h, w, C)[:, ::2, ::2]`` to subsample). No class token: the head averages the tokens.

The default layer is the last token stage, its grid the one a whole stride gives on the input
(``salience.methods._tokens``), checked against Grad-CAM written out by hand on grids written by hand.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand, row_major
from tiny_vit import TinyViT

import timm  # noqa: E402 - in the test extra: tested, never skipped
import transformers  # noqa: E402
from transformers import LevitConfig, LevitForImageClassification  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("timm").setLevel(logging.ERROR)


def redraw_attention_biases(net):
    """Re-draw LeViT's attention biases (timm and Hugging Face initialise them to 0) from a seeded normal, std 5.
    With them at 0 the attention that subsamples the tokens is near uniform, so every query averages the same
    values: at timm's init all 16 tokens of the last stage are the same vector (their spread 1e-7 of their norm),
    each image's Grad-CAM map constant, and a wrong token order invisible. Biased by relative position, each query
    attends to its own neighbourhood: the tokens spread (0.2 of their norm) and each image's map varies."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(5 * torch.randn(p.shape, generator=g))
    for m in net.modules():  # both cache the biases gathered per position pair in eval mode
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}
    return net


def hf_levit(size):
    torch.manual_seed(0)
    cfg = LevitConfig(image_size=size, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2], depths=[1, 1, 1],
                      key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], num_labels=5)
    return redraw_attention_biases(LevitForImageClassification(cfg).eval())


def timm_levit(size):
    torch.manual_seed(0)
    return redraw_attention_biases(timm.create_model("levit_128s", pretrained=False, img_size=size).eval())


def by_hand(net, x, layer, target, h, w):
    """Grad-CAM written out on the layer's tokens (B, N, D), reshaped by hand to (B, D, h, w),
    row-major (hand_cams.gradcam_by_hand)."""
    return gradcam_by_hand(net, x, layer, target, row_major(h, w))


@pytest.mark.parametrize("build, size, layer, grid", [
    (timm_levit, (224, 224), "stages", (4, 4)),
    (timm_levit, (160, 224), "stages", (3, 4)),  # 10x14 -> 5x7 -> 3x4
    (hf_levit, (192, 192), "levit.encoder.stages.2", (3, 3)),  # 12x12 -> 6x6 -> 3x3
])
def test_default_layer_is_the_last_token_stage_and_gradcam_equals_the_hand_computation(build, size, layer, grid):
    net = build(size if build is timm_levit else size[0])
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size)
    assert default_layer(net, x) == layer
    said = describe_default_layer(net, x)
    assert f"0 prefix token(s) + a {grid[0]}x{grid[1]} grid" in said and "the last layer with a spatial map" in said
    assert "class token" not in said  # LeViT has none: the old reason (the ViT rule's) was wrong here
    target = torch.tensor([2, 3])  # with the biases re-drawn, targets where neither image's map is all 0
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = by_hand(net, x, layer, target, *grid)
    # each image's map varies over positions (at timm's init it was constant: image 0 all 0, image 1 one value),
    # so a wrong token order shows; the maps are small (1e-6, Hugging Face's 1e-10): the tolerance is relative
    assert cam.shape == (2, *size) and (ref.flatten(1).std(1) > 0.1 * ref.flatten(1).amax(1)).all()
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the grid given by hand reads the same tokens the same way
    torch.testing.assert_close(salience.gradcam(net, x, target, grid=grid, prefix_tokens=0), cam)


def test_the_other_cams_take_the_default_too():
    net, x = hf_levit(64 * 3), torch.rand(1, 3, 192, 192)
    for method in (salience.gradcam_plus_plus, salience.layercam, salience.scorecam):
        m = method(net, x, 2)
        assert m.shape == (1, 192, 192) and torch.isfinite(m).all()


def test_hf_levit_with_one_token_left_takes_the_last_spatial_layer_and_says_why():
    """At 64 px the 4x4 tokens become 2x2, then 1: the last stage's map would be one constant value."""
    net, x = hf_levit(64), torch.rand(2, 3, 64, 64)
    said = describe_default_layer(net, x)
    assert said.startswith("levit.encoder.stages.1.layers.1 ") and "a 2x2 grid" in said
    assert "'levit.encoder.stages.2' holds a single token on this input, so its map would be constant" in said
    target = torch.tensor([0, 3])  # class 4 cut image 1's map to 0 (ReLU): the comparison passed as 0 = 0
    ref = by_hand(net, x, "levit.encoder.stages.1.layers.1", target, 2, 2)
    assert_each_varies(ref)
    # the maps are ~1e-10: an absolute 1e-6 passed any map (the swapped targets [3, 0] too); relative now
    torch.testing.assert_close(salience.gradcam(net, x, target), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # asked for, the one-token stage is read as a 1x1 grid: a constant map, as a CNN's 1x1 layer gives
    flat = salience.gradcam(net, x, target, layer="levit.encoder.stages.2")
    # (constant up to the rounding of the bilinear upsampling of one value: 3.6e-10 on image 1 at class 3)
    assert (flat.flatten(1).std(1) <= 1e-6 * flat.flatten(1).abs().amax(1)).all()


def test_tokens_that_fit_two_readings_still_ask_for_grid_and_prefix_tokens():
    """No patch convolution (unfold + Linear), 4-pixel patches on an 8x12 input: 6 tokens are a 2x3 grid,
    or 2 prefix tokens and a 2x2 grid (a stride of 4 or 6): salience does not guess."""
    torch.manual_seed(0)
    net, x = TinyViT(size=(8, 12), patch=4, prefix=0, conv=False).eval(), torch.rand(2, 3, 8, 12)
    with pytest.raises(SalienceError, match=r"6 tokens.*several readings of the 8x12 input \(2x3 patches, "
                                            r"2 prefix token\(s\) \+ 2x2 patches\).*--grid H,W --prefix-tokens K"):
        salience.gradcam(net, x, 1)
    assert salience.gradcam(net, x, 1, grid=(2, 3), prefix_tokens=0).shape == (2, 8, 12)
    # one class token before 3x5 patches: 16 tokens fit no grid of 24x40, 15 do: it says which to pass
    torch.manual_seed(0)
    net, x = TinyViT(size=(24, 40), patch=8, prefix=1, conv=False).eval(), torch.rand(1, 3, 24, 40)
    with pytest.raises(SalienceError, match=r"only after prefix tokens \(1 prefix token\(s\) \+ 3x5 patches: if so, "
                                            r"pass prefix_tokens=1"):
        salience.gradcam(net, x, 1)
    assert salience.gradcam(net, x, 1, prefix_tokens=1).shape == (1, 24, 40)


def test_list_says_the_levit_default_layer_and_its_grid(capsys):
    from salience.cli import main

    assert main(["list", "--model", "timm:levit_128s", "--weights", "random"]) == 0
    out = capsys.readouterr().out
    assert ("Grad-CAM layer (default; --layer to change): stages (Sequential, output (1, 16, 384): tokens (B, N, D): "
            "0 prefix token(s) + a 4x4 grid of patches; the last layer with a spatial map)") in out
    # LeViT's attention subsamples its tokens: the attention methods refuse it, so they are not listed
    methods = next(line for line in out.splitlines() if "methods that apply" in line)
    assert "gradcam" in methods and "attention_rollout" not in methods and "transformer_attribution" not in methods


@pytest.mark.parametrize("build", [lambda: timm_levit(224), lambda: hf_levit(64)])
def test_default_methods_with_an_input_leave_out_the_attention_methods_levit_refuses(build):
    """LeViT has attention modules, so by the model alone the attention methods were offered (salience list,
    demo, evaluate), and each refused it: its attention subsamples the tokens ((1, 8, 49, 196) at 224 px), and it
    has no class token. With an input, default_methods runs attention rollout once and leaves both out."""
    from salience.methods import ATTENTION_METHODS, default_methods

    net = build()
    x = torch.rand(1, 3, *((224, 224) if isinstance(net, timm.models.levit.Levit) else (64, 64)))
    assert ATTENTION_METHODS <= set(default_methods(net))  # the model alone cannot tell
    assert not ATTENTION_METHODS & set(default_methods(net, x))
    assert set(default_methods(net)) - set(default_methods(net, x)) == ATTENTION_METHODS
    for name in ATTENTION_METHODS:
        with pytest.raises(SalienceError, match="attention that subsamples or pools the tokens|all patches"):
            getattr(salience, name)(net, x, 1)


def test_default_methods_with_an_input_keep_the_attention_methods_of_a_vit():
    from salience.methods import ATTENTION_METHODS, default_methods

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2, num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    assert ATTENTION_METHODS <= set(default_methods(vit, x))
    for name in ATTENTION_METHODS:
        assert getattr(salience, name)(vit, x, 1).shape == (2, 32, 32)


def timm_hiera(size=128):
    torch.manual_seed(0)
    net = timm.create_model("hiera_tiny_224", pretrained=False, img_size=size).eval()
    torch.nn.init.normal_(net.head.fc.weight, std=0.02)  # timm initialises it to 0: every logit and gradient 0
    return net


def hiera_tokens(net, x, upto):
    """timm Hiera's tokens after block ``upto``, as its forward_features computes them (unrolled order)."""
    with torch.no_grad():
        t = net.unroll(net._pos_embed(net.patch_embed(x)))
        for block in net.blocks[:upto + 1]:
            t = block(t)
    return t


def test_hiera_default_layer_is_its_last_stage_in_grid_order_and_gradcam_equals_the_hand_computation():
    """timm Hiera (no patch embedding by salience's rule: a 7x7 convolution with stride 4) unrolls its tokens
    and q-pools them; after the last pooling (block 10, the last stage) they are row-major again: timm's own
    reroll of the last block's tokens is the row-major reshape. Grad-CAM there = the hand computation."""
    net, x, target = timm_hiera(), torch.rand(2, 3, 128, 128), torch.tensor([1, 3])
    assert default_layer(net, x) == "blocks.11"
    assert "a 4x4 grid of patches" in describe_default_layer(net, x)
    tokens = hiera_tokens(net, x, 11)
    torch.testing.assert_close(net.reroll(tokens, 11), tokens.reshape(2, 4, 4, -1))  # timm's reroll: row-major
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = by_hand(net, x, "blocks.11", target, 4, 4)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    ref10 = by_hand(net, x, "blocks.10", target, 4, 4)
    assert_each_varies(ref10)
    torch.testing.assert_close(salience.gradcam(net, x, target, layer="blocks.10"), ref10, rtol=1e-4, atol=1e-6)


def test_hiera_layers_before_its_tokens_are_rerolled_are_refused():
    """Before the last q-pooling the tokens are in Hiera's unrolled order (timm's reroll of block 9's tokens is
    not their row-major reshape): a map of them would be scrambled, so it is refused, grid= or not, naming the
    last stage. (It gave a scrambled map before.)"""
    net, x = timm_hiera(), torch.rand(1, 3, 128, 128)
    tokens = hiera_tokens(net, x, 9)
    assert not torch.allclose(net.reroll(tokens, 9), tokens.reshape(1, 8, 8, -1))
    for layer, n in [("blocks.9", 64), ("blocks.10.norm1", 64), ("blocks.2", 256), ("unroll", 1024)]:
        for grid in (None, (int(n ** 0.5),) * 2):
            with pytest.raises(SalienceError, match=rf"'{layer}' gives {n} tokens that are not in grid order: timm's "
                                                    r"Hiera keeps its tokens \"unrolled\".*choose a layer of its last "
                                                    r"stage, where they are back in grid order: 'blocks.11'"):
                salience.gradcam(net, x, 1, layer=layer, grid=grid)
    # the patch embedding's tokens come before the unroll: row-major, still allowed
    assert salience.gradcam(net, x, 1, layer="patch_embed").shape == (1, 128, 128)


def test_hugging_face_hiera_before_its_last_stage_is_refused_and_its_last_stage_is_not():
    from transformers import HieraConfig, HieraForImageClassification

    torch.manual_seed(0)
    net = HieraForImageClassification(HieraConfig(embed_dim=8, image_size=[64, 64], depths=[1, 1, 1, 1],
                                                  num_heads=[1, 1, 1, 1], num_labels=5)).eval()
    x = torch.rand(1, 3, 64, 64)
    assert default_layer(net, x) == "hiera.encoder.stages.3"
    with pytest.raises(SalienceError, match=r"16 tokens that are not in grid order: Hugging Face's Hiera.*"
                                            r"'hiera.encoder.stages.3' or a module inside it"):
        salience.gradcam(net, x, 1, layer="hiera.encoder.stages.3.layers.0.layernorm_before")  # before its q-pooling
    for layer in ("hiera.encoder.stages.2.layers.0.mlp", "hiera.encoder.stages.0.layers.0.layernorm_before"):
        with pytest.raises(SalienceError, match="not in grid order"):
            salience.gradcam(net, x, 1, layer=layer)
    layer = "hiera.encoder.stages.3.layers.0.layernorm_after"
    ref = by_hand(net, x, layer, torch.tensor([1]), 2, 2)
    assert_each_varies(ref)
    torch.testing.assert_close(salience.gradcam(net, x, 1, layer=layer), ref, rtol=1e-4, atol=1e-6)


def hf_hiera(depths=(1, 1, 1, 2)):
    from transformers import HieraConfig, HieraForImageClassification

    torch.manual_seed(0)
    return HieraForImageClassification(HieraConfig(embed_dim=8, image_size=[64, 64], depths=list(depths),
                                                   num_heads=[1, 1, 1, 1], num_labels=5)).eval()


def test_hugging_face_hiera_default_is_its_last_block_output_and_gradcam_equals_the_hand_computation():
    """Hugging Face's Hiera blocks return ``(hidden_states, attention weights)``: the default was the last
    block's ``mlp`` (its MLP branch, before the residual add), the last module whose output was a tensor. It
    is now the last stage (its output's first element: the last block's output, as timm's ``blocks.11``), and
    Grad-CAM there equals the hand computation on the last block's output; the other CAMs read it too."""
    net, x, target = hf_hiera(), torch.rand(2, 3, 64, 64), torch.tensor([1, 3])
    assert default_layer(net, x) == "hiera.encoder.stages.3"
    assert "a 2x2 grid of patches" in describe_default_layer(net, x)
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = by_hand(net, x, "hiera.encoder.stages.3.layers.1", target, 2, 2)  # the last block's output
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ref, by_hand(net, x, "hiera.encoder.stages.3.layers.1.mlp", target, 2, 2))
    ref0 = by_hand(net, x, "hiera.encoder.stages.3.layers.0", target, 2, 2)
    assert_each_varies(ref0)
    torch.testing.assert_close(salience.gradcam(net, x, target, layer="hiera.encoder.stages.3.layers.0"), ref0,
                               rtol=1e-4, atol=1e-6)
    for name in ("eigencam", "scorecam", "ablationcam", "layercam"):
        assert salience.METHODS[name](net, x[:1], 1).shape == (1, 64, 64)


def test_a_given_grid_in_another_shape_than_the_one_a_stride_gives_is_refused():
    """timm LeViT at 160x224: the last stage's 12 tokens are 3x4 (10x14 -> 5x7 -> 3x4). grid=(4, 3) has the same
    cells in another shape: it was read as given and the map came back scrambled; now it is refused, naming 3x4,
    as a grid against a patch embedding's is. grid=(3, 4) gives the default's map."""
    net, x = timm_levit((160, 224)), torch.rand(1, 3, 160, 224)
    for prefix in (None, 0):
        with pytest.raises(SalienceError, match=r"grid=\(4, 3\) has 12 cells, but on the 160x224 input a whole stride "
                                                r"gives that many only as 3x4.*pass grid=\(3, 4\) \(command line: "
                                                r"--grid 3,4\), or leave grid out"):
            salience.gradcam(net, x, 1, grid=(4, 3), prefix_tokens=prefix)
    torch.testing.assert_close(salience.gradcam(net, x, 1, grid=(3, 4)), salience.gradcam(net, x, 1))


class _ValidConvTokens(torch.nn.Module):
    """A 3x3 convolution without padding on a 10x10 input: 8x8 tokens, a grid no whole stride of 10x10 gives."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).flatten(2).transpose(1, 2)).mean(1))


def test_a_given_grid_where_no_stride_grid_fits_still_works():
    """No whole stride of 10x10 gives 8x8, but the convolution's own map is 8x8 with the tokens' 64 cells: the
    tokens are read on it (``salience.methods._tokens``: the model's own grids; refused before), given or not."""
    torch.manual_seed(0)
    net, x, target = _ValidConvTokens().eval(), torch.rand(2, 3, 10, 10), torch.tensor([0, 2])
    ref = by_hand(net, x, "norm", target, 8, 8)
    assert_each_varies(ref)
    torch.testing.assert_close(salience.gradcam(net, x, target, layer="norm"), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(salience.gradcam(net, x, target, layer="norm", grid=(8, 8)), ref, rtol=1e-4, atol=1e-6)


class Attention(nn.Module):
    """Self-attention over tokens (B, N, D): queries, keys and values from one Linear (B, N, 3D)."""

    def __init__(self, dim):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, t):
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t):
        t = t + self.attn(self.norm1(t))
        return t + self.mlp(self.norm2(t))


class SelfAttentionBlock(nn.Module):
    """A whole token stage (two blocks, then the mean over the tokens) under a class name with "Attention" in it."""

    def __init__(self, dim):
        super().__init__()
        self.blocks = nn.Sequential(Block(dim), Block(dim))

    def forward(self, t):
        return self.blocks(t).mean(dim=1)


class StageNet(nn.Module):
    """A strided convolution (no patch embedding: kernel 3, stride 4), its 8x8 map as 64 tokens, one stage."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, stride=4, padding=1)
        self.stage, self.head = SelfAttentionBlock(dim), nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.stage(self.stem(x).flatten(2).transpose(1, 2)))


def test_a_stage_class_named_attention_block_keeps_its_blocks_as_default_layer_candidates():
    """Token outputs inside any module whose class name contained "Attention" were left out of the default
    layer's candidates (meant for queries / keys / values): a stage class named ``SelfAttentionBlock`` hid
    its blocks, and the default fell back to the stem. Now only the innermost attention modules' insides
    are left out: the default is the last block's output (the blocks' Sequential, a container preferred to its
    last child), its Grad-CAM the hand computation."""
    torch.manual_seed(1)
    net, x, target = StageNet().eval(), torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    assert default_layer(net, x) == "stage.blocks"  # the Sequential of the blocks: the last block's output
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = by_hand(net, x, "stage.blocks.1", target, 8, 8)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


class Conv1dNet(nn.Module):
    """A strided convolution's 16x16 map flattened to (B, 8, 256), then a Conv1d to (B, 256, 256): 256
    channels at dim 1 over 256 positions, which also fits 16x16 tokens of width 256."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.mix = nn.Conv1d(8, 256, 1)
        self.head = nn.Linear(256, 5)

    def forward(self, x):
        return self.head(self.mix(self.stem(x).flatten(2)).mean(dim=2))


class FlatNet(nn.Module):
    """A strided convolution's 8x8 map of 64 channels flattened to (B, 64, 64) and normalised: 64 tokens of
    width 64 by shape."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 64, 3, stride=4, padding=1), nn.Flatten(2), nn.BatchNorm1d(64))
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=2))


def by_hand_map(net, x, layer, target):
    """Grad-CAM written out on a (B, K, h, w) map."""
    return gradcam_by_hand(net, x, layer, target)


@pytest.mark.parametrize("build, default, flat", [(Conv1dNet, "stem", "mix"), (FlatNet, "features.0", "features")])
def test_a_conv1d_or_flattened_map_is_not_read_as_tokens(build, default, flat):
    """A (B, C, L) output (a Conv1d's, a flattened map's) whose C is the module's channel count and whose L
    fits a stride grid was read as tokens (B, N, D) with N = C: channels taken for patches, a scrambled map,
    and the default layer. It is no default candidate now (the default is the map before it, its Grad-CAM the
    hand computation), and asked for by name it is refused, saying its channels are at dim 1."""
    torch.manual_seed(0)
    net, x, target = build().eval(), torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    assert default_layer(net, x) == default
    ref = by_hand_map(net, x, default, target)
    assert_each_varies(ref)
    torch.testing.assert_close(salience.gradcam(net, x, target), ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(SalienceError, match=rf"layer '{flat}' gives shape \(2, (256, 256|64, 64)\) with its "
                                            r"(256|64) channels at dim 1, \(B, C, L\)"):
        salience.gradcam(net, x, target, layer=flat)


def test_default_methods_without_an_input_read_the_models_input_size():
    """Without an input, default_methods listed the attention methods for any model with attention modules,
    LeViT too, although both refuse it (salience list --model before --model took an image, the examples,
    evaluate's callers). A model that says its input size (its ModelInfo, as load_model attaches) is now
    tried on a random image of that size: the same list as with an image. A bare module says nothing: kept."""
    from salience._core.info import ModelInfo, attach_info
    from salience.methods import ATTENTION_METHODS, GUIDED_METHODS, METHODS, default_methods

    net = timm_levit(224)
    assert ATTENTION_METHODS <= set(default_methods(net))  # a bare module: its size is not known
    attach_info(net, ModelInfo(name="levit", input_size=(224, 224)))
    rng = torch.get_rng_state()
    # the guided methods too: their rules refuse LeViT's Hardswish (salience.methods.GUIDED_METHODS)
    assert set(default_methods(net)) == set(METHODS) - ATTENTION_METHODS - GUIDED_METHODS
    assert torch.equal(torch.get_rng_state(), rng)  # its random image leaves the global seed alone
    for name in ATTENTION_METHODS:  # each refuses a 224-pixel image, as the list says
        with pytest.raises(SalienceError, match="attention that subsamples or pools the tokens|all patches"):
            getattr(salience, name)(net, torch.rand(1, 3, 224, 224), 1)
    # a size the model cannot take (a 64-pixel LeViT told 224): nothing is known, the modules decide
    small = attach_info(timm_levit(64), ModelInfo(name="levit", input_size=(224, 224)))
    assert ATTENTION_METHODS <= set(default_methods(small))


def test_the_per_image_check_fails_on_maps_each_constant_at_different_values():
    """The check the tests above make of their reference maps: a std over the batch passed on two maps each
    constant (at different values); each image's map must vary, up to rounding."""
    maps = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 2.0)])
    assert maps.std() > 0
    with pytest.raises(AssertionError, match="a constant map"):
        assert_each_varies(maps)
    with pytest.raises(AssertionError, match="a constant map"):
        assert_each_varies(torch.stack([torch.rand(4, 4), torch.full((4, 4), 3.0) + 1e-6 * torch.rand(4, 4)]))
    assert_each_varies(torch.rand(2, 4, 4))
