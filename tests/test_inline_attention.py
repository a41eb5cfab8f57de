"""Attention written as a bare function, not in an ``nn.MultiheadAttention`` / timm ``Attention`` module
nor in a class named ``...Attention``: an own-code ViT whose blocks call ``F.scaled_dot_product_attention``
or compute ``softmax(q k^T) v`` inline in a module named ``Mixer`` (or in the block itself). The CAMs' default
layer was the patch embedding (the map rule: nothing looked like attention), said nowhere; timm's
``vit_small_patch16_rope_224`` (``AttentionRope``, not named ``...Attention``) got ``patch_embed`` so. Now the
module that runs an attention operation counts as attention; the default is the last block's norm before its
attention, Grad-CAM there equals the hand computation; rollout equals a hand-written rollout; a model whose own
forward computes the attention has no default layer and is refused saying to pass ``layer=``."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError
from salience.methods import default_methods
from salience.methods.gradcam import default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand, row_major

D, HEADS = 16, 2


def _attention(qkv: nn.Linear, t: torch.Tensor, sdpa: bool) -> torch.Tensor:
    b, n, d = t.shape
    q, k, v = qkv(t).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    if sdpa:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = (q @ k.transpose(-1, -2) * (d // HEADS) ** -0.5).softmax(-1) @ v
    return o.transpose(1, 2).reshape(b, n, d)


class Mixer(nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        self.qkv, self.proj, self.sdpa = nn.Linear(D, 3 * D), nn.Linear(D, D), sdpa

    def forward(self, t):
        return self.proj(_attention(self.qkv, t, self.sdpa))


class Block(nn.Module):
    def __init__(self, sdpa: bool, inline: bool):
        super().__init__()
        self.norm1, self.norm2, self.inline = nn.LayerNorm(D), nn.LayerNorm(D), inline
        if inline:  # the attention in the block's own forward, its weights held by the block
            self.qkv, self.proj, self.sdpa = nn.Linear(D, 3 * D), nn.Linear(D, D), sdpa
        else:
            self.mix = Mixer(sdpa)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, t):
        u = self.norm1(t)
        t = t + (self.proj(_attention(self.qkv, u, self.sdpa)) if self.inline else self.mix(u))
        return t + self.mlp(self.norm2(t))


class OwnViT(nn.Module):
    """Patch conv 8x8, a class token, 2 blocks; 1 + 4x4 tokens at 32 px. ``in_forward``: the model's own
    forward runs a last attention itself (no submodule)."""

    def __init__(self, sdpa: bool = True, inline: bool = False, in_forward: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, D, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 17, D))
        self.blocks = nn.Sequential(Block(sdpa, inline), Block(sdpa, inline))
        self.in_forward = in_forward
        self.qkv = nn.Linear(D, 3 * D)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        t = self.blocks(t)
        if self.in_forward:
            t = t + _attention(self.qkv, t, True)
        return self.head(self.norm(t)[:, 0])


def _net(**kw) -> OwnViT:
    torch.manual_seed(0)
    return OwnViT(**kw).eval()


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "softmax"])
def test_attention_in_a_mixer_module_gives_the_vit_default_layer(sdpa):
    net, x, target = _net(sdpa=sdpa), torch.rand(2, 3, 32, 32), torch.tensor([0, 3])  # each image's map varies
    assert default_layer(net, x) == "blocks.1.norm1"  # was 'embed', the patch convolution
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = gradcam_by_hand(net, x, "blocks.1.norm1", target, row_major(4, 4, prefix=1))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_attention_inline_in_a_block_gives_the_last_blocks_input():
    """The block computes the attention itself: the module that finished last before it, outside it, with
    its token shape is the previous block, the last block's input (every token still reaches the output)."""
    net, x, target = _net(sdpa=False, inline=True), torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    assert default_layer(net, x) == "blocks.0"
    cam = salience.gradcam(net, x, target)
    ref = gradcam_by_hand(net, x, "blocks.0", target, row_major(4, 4, prefix=1))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_attention_in_the_models_own_forward_is_refused_naming_layer():
    net, x = _net(in_forward=True), torch.rand(1, 3, 32, 32)
    with pytest.raises(SalienceError, match=r"in its own forward, not in a submodule.*Pass layer="):
        default_layer(net, x)
    # named, it runs: the input of the model's own attention is the last block's output
    target = torch.tensor([1])
    ref = gradcam_by_hand(net, x, "blocks.1", target, row_major(4, 4, prefix=1))
    assert_each_varies(ref)
    torch.testing.assert_close(salience.gradcam(net, x, target, layer="blocks.1"), ref, rtol=1e-4, atol=1e-6)


def _rollout_by_hand(net: OwnViT, x: torch.Tensor) -> torch.Tensor:
    """Abnar & Zuidema's rollout written out: each block's A = softmax(q k^T / sqrt(d)) from its norm1's output
    and its weights, mean over heads, 0.5 A + 0.5 I renormalized, the product, the class token's row, 4x4."""
    kept = []
    hooks = [b.norm1.register_forward_hook(lambda m, i, o: kept.append(o.detach())) for b in net.blocks]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    eye = torch.eye(17, dtype=x.dtype)
    r = eye.expand(len(x), 17, 17)
    for blk, u in zip(net.blocks, kept):
        q, k, _ = blk.mix.qkv(u).detach().reshape(len(x), 17, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, -1).mean(1)
        a = 0.5 * a + 0.5 * eye
        r = (a / a.sum(-1, keepdim=True)) @ r
    m = r[:, 0, 1:].reshape(len(x), 1, 4, 4)
    return F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "softmax"])
def test_rollout_on_a_mixer_equals_the_hand_written_rollout(sdpa):
    net, x = _net(sdpa=sdpa), torch.rand(2, 3, 32, 32)
    with unchanged(net):
        got = salience.attention_rollout(net, x)
    ref = _rollout_by_hand(net, x)
    assert_each_varies(ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_default_methods_offer_the_attention_methods_when_rollout_runs():
    """They were left out by the modules' class names (no ...Attention), though both run."""
    net, x = _net(), torch.rand(1, 3, 32, 32)
    assert {"attention_rollout", "transformer_attribution", "gradcam"} <= set(default_methods(net, x))


def test_timm_rope_vit_default_is_the_last_norm1_not_the_patch_embedding():
    """timm's ``AttentionRope`` (class name not ending in Attention) calls SDPA: its default was ``patch_embed``."""
    timm = pytest.importorskip("timm")
    logging.getLogger("timm").setLevel(logging.ERROR)
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch16_rope_224", pretrained=False, img_size=32, depth=2, embed_dim=32,
                            num_heads=2, num_classes=5).eval()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    assert default_layer(net, x) == "blocks.1.norm1"
    ref = gradcam_by_hand(net, x, "blocks.1.norm1", target, row_major(2, 2, prefix=1))
    assert_each_varies(ref)
    # the maps are ~1e-10: an absolute 1e-6 passed any map (swapped targets too); the tolerance is relative
    torch.testing.assert_close(salience.gradcam(net, x, target), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


class WidthSoftmaxCNN(nn.Module):
    """A CNN whose own forward takes a softmax over the width of its (B, C, H, W) map (8x4 at 32x16 px):
    a spatial weighting, not self-attention (not square, no tokens)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(torch.relu(self.conv1(x)))
        a = a * a.softmax(-1)
        return self.head(a.mean((2, 3)))


def test_softmax_over_a_maps_width_in_the_models_own_forward_keeps_the_default_layer():
    """A softmax over the last dim of a (1, C, H, W) map in the model's own forward was refused as inline
    attention; attention weights are square (1, heads, N, N), this (1, 8, 8, 4) is not: the default is the last
    map, ``conv2``, and Grad-CAM there is the hand computation."""
    torch.manual_seed(0)
    net = WidthSoftmaxCNN().eval()
    x, target = torch.rand(2, 3, 32, 16), torch.tensor([1, 2])  # each image's map varies
    assert default_layer(net, x) == "conv2"
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = gradcam_by_hand(net, x, "conv2", target)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


# --- attention laid out with the keys on dim 1; local (outlook) attention ---------------------------------

class KeysFirstMixer(nn.Module):
    """``mix``'s attention (the same ``qkv`` / ``proj``) computed with the keys on dim 1: logits ``(B, S, heads, L)``
    (``"bshl"``) or ``(B, S, L, heads)`` (``"bslh"``) by einsum, ``softmax(dim=1)``, then ``A v`` by einsum; or
    ``"cast"``: the logits cast to float32 for the softmax and back (``.float().softmax(-1).to(q.dtype)``); or
    ``"bmm"``: ``(B, S, L, heads)`` copied to ``(B * heads, L, S)`` by ``reshape``, then ``bmm``; or
    ``"special"``: ``torch.special.softmax(..., -1)`` (the capture took it, the default-layer search did not: 'embed')."""

    def __init__(self, mix: Mixer, layout: str):
        super().__init__()
        self.qkv, self.proj, self.layout = mix.qkv, mix.proj, layout

    def forward(self, t):
        b, n, d = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        q = q * (d // HEADS) ** -0.5
        if self.layout == "cast":
            o = (q @ k.transpose(-1, -2)).float().softmax(-1).to(q.dtype) @ v
        elif self.layout == "bmm":  # keys first, the weights copied to (B * heads, L, S) for bmm
            a = torch.einsum("bhld,bhsd->bslh", q, k).softmax(dim=1).permute(0, 3, 2, 1).reshape(b * HEADS, n, n)
            o = torch.bmm(a, v.reshape(b * HEADS, n, d // HEADS)).reshape(b, HEADS, n, d // HEADS)
        elif self.layout == "special":
            o = torch.special.softmax(q @ k.transpose(-1, -2), -1) @ v
        else:
            a = torch.einsum(f"bhld,bhsd->{self.layout}", q, k).softmax(dim=1)
            o = torch.einsum(f"{self.layout},bhsd->bhld", a, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


def _keys_first_net(layout: str) -> OwnViT:
    net = _net(sdpa=False)
    for blk in net.blocks:
        blk.mix = KeysFirstMixer(blk.mix, layout)
    return net.double() if layout == "cast" else net  # float64: the cast makes a float32 copy


@pytest.mark.parametrize("layout", ["bshl", "bslh", "bmm", "cast", "special"])
def test_attention_with_the_keys_on_dim_1_or_a_cast_softmax_is_captured(layout):
    """A softmax over dim 1 of ``(B, S, heads, L)`` / ``(B, S, L, heads)`` was not seen (``saw no attention``):
    it is the attention ``(B, heads, L, S)`` permuted. Rollout equals the hand-written rollout; transformer
    attribution equals the one of the same weights with the attention laid out ``(B, heads, L, S)``."""
    net, x = _keys_first_net(layout), torch.rand(2, 3, 32, 32)
    x = x.to(net.cls.dtype)
    assert default_layer(net, x) == "blocks.1.norm1"  # the mixer runs attention (was 'embed' for dim 1)
    with unchanged(net):
        got = salience.attention_rollout(net, x)
        attr = salience.transformer_attribution(net, x, torch.tensor([0, 3]))
    ref = _rollout_by_hand(_net(sdpa=False).to(x.dtype), x)
    assert_each_varies(ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    plain = salience.transformer_attribution(_net(sdpa=False).to(x.dtype), x, torch.tensor([0, 3]))
    assert_each_varies(plain)
    torch.testing.assert_close(attr, plain, rtol=1e-4, atol=1e-6)


class LocalMixer(nn.Module):
    """Outlook attention as VOLO's (kernel 3): each of the 4x4 patches attends to its 3x3 neighbourhood with
    weights from a linear map of its own token, a softmax over the last dim of ``(B, heads, 16, 9, 9)``."""

    def __init__(self):
        super().__init__()
        self.v, self.attn, self.proj = nn.Linear(D, D), nn.Linear(D, 81 * HEADS), nn.Linear(D, D)
        self.unfold = nn.Unfold(3, padding=1)

    def forward(self, t):
        b, n, d = t.shape
        v = self.unfold(self.v(t).transpose(1, 2).reshape(b, d, 4, 4))  # (B, d * 9, 16)
        v = v.reshape(b, HEADS, d // HEADS, 9, n).permute(0, 1, 4, 3, 2)  # (B, heads, 16, 9, d / heads)
        a = self.attn(t).reshape(b, n, HEADS, 9, 9).transpose(1, 2).softmax(-1)
        o = (a @ v).permute(0, 1, 4, 3, 2).reshape(b, d * 9, n)
        return self.proj(F.fold(o, (4, 4), 3, padding=1).flatten(2).transpose(1, 2))


class LocalThenGlobal(nn.Module):
    """A local (outlook) attention over the 4x4 patches, then the class token and a global attention block."""

    def __init__(self):
        super().__init__()
        self.embed, self.local = nn.Conv2d(3, D, 8, 8), LocalMixer()
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.block, self.head = Block(sdpa=True, inline=False), nn.Linear(D, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.local(t)
        return self.head(self.block(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))[:, 0])


@pytest.mark.parametrize("method", ["attention_rollout", "transformer_attribution"])
def test_local_outlook_attention_is_refused_saying_to_use_gradcam(method):
    """VOLO's outlook attention (a softmax over ``(B, heads, positions, 9, 9)``) was flattened into "heads" and
    refused for the global layers' shapes instead (``(1, 12, 196, 196)`` named as the odd ones out); now the
    refusal names the local attention and says what to use, and gradcam runs on the model."""
    torch.manual_seed(0)
    net, x = LocalThenGlobal().eval(), torch.rand(2, 3, 32, 32)
    with unchanged(net), pytest.raises(SalienceError, match=r"1 of the model's 2 attention operations is local.*"
                                                           r"\(2, 2, 16, 9, 9\).*VOLO's outlook.*gradcam"):
        getattr(salience, method)(net, x, 1)
    assert salience.gradcam(net, x, 1).shape == (2, 32, 32)


def test_timm_volo_is_refused_naming_its_outlook_attention():
    pytest.importorskip("timm")
    from timm.models.volo import VOLO

    logging.getLogger("timm").setLevel(logging.ERROR)
    torch.manual_seed(0)
    net = VOLO(layers=[1, 1], img_size=32, embed_dims=[16, 32], num_heads=[1, 2], stem_hidden_dim=8, num_classes=5,
               downsamples=(True, False), outlook_attention=(True, False), post_layers=("ca",)).eval()
    with pytest.raises(SalienceError, match=r"local, a softmax over a 5-D \(1, 1, 4, 9, 9\).*outlook.*gradcam"):
        salience.attention_rollout(net, torch.rand(1, 3, 32, 32))


def test_torchvision_maxvit_is_refused_naming_its_windowed_attention():
    """MaxViT's block and grid attention (a softmax over ``(B, windows, heads, 49, 49)``) was refused with the
    outlook layout ``(B, heads, positions, K*K, K*K)`` as if it were VOLO's; the message now fits both."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.MaxVit(input_size=(56, 56), stem_channels=8, partition_size=7, block_channels=[16],
                                    block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=5).eval()
    with unchanged(net), pytest.raises(SalienceError, match=r"2 of the model's 2 attention operations are local, a "
                                                           r"softmax over a 5-D \(1, 4, 2, 49, 49\).*MaxViT's block "
                                                           r"and grid attention.*gradcam"):
        salience.attention_rollout(net, torch.rand(1, 3, 56, 56))


class ChannelSoftmaxCNN(WidthSoftmaxCNN):
    """A CNN weighting its (B, C, H, W) map by a softmax over the channels (channel attention, as in SK / split
    attention blocks): at 32x16 px the map is (B, 8, 8, 4), C == H, the shape of keys-first attention
    ``(B, S, L, heads)``; but the weights only scale the map, no product contracts them with values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(torch.relu(self.conv1(x)))
        a = a * a.softmax(1)
        return self.head(a.mean((2, 3)))


def test_softmax_over_the_channels_of_a_cnn_map_is_not_attention():
    """A softmax over dim 1 of a (B, C, H, W) map with C == H was taken for keys-first attention: the CNN's
    default layer was refused ("computes attention in its own forward"), gradcam left out of its methods, and
    rollout read 8 "tokens". Keys-first attention is the softmax whose output a product contracts with values."""
    torch.manual_seed(0)
    net = ChannelSoftmaxCNN().eval()
    x, target = torch.rand(2, 3, 32, 16), torch.tensor([1, 2])
    assert default_layer(net, x) == "conv2"
    assert "gradcam" in default_methods(net, x)
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = gradcam_by_hand(net, x, "conv2", target)
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    for method in ("attention_rollout", "transformer_attribution"):
        with pytest.raises(SalienceError, match="saw no attention operation"):
            getattr(salience, method)(net, x, target)


def test_timm_resnest_split_attention_is_not_taken_for_attention():
    """timm's ResNeSt with as many groups as radix splits (``cardinality=2``, radix 2): its split attention's
    softmax over dim 1 of ``(B, radix, cardinality, C / cardinality)`` has the keys-first shape ``(B, S, L, heads)``;
    attention_rollout ran on this CNN (a map from 2 "tokens"). It only weights the splits: no attention."""
    timm = pytest.importorskip("timm")
    logging.getLogger("timm").setLevel(logging.ERROR)
    torch.manual_seed(0)
    net = timm.create_model("resnest14d", pretrained=False, cardinality=2, num_classes=5).eval()
    x = torch.rand(1, 3, 32, 32)
    with unchanged(net), pytest.raises(SalienceError, match="saw no attention operation"):
        salience.attention_rollout(net, x, 0)
