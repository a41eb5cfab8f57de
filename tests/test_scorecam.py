"""Score-CAM and Ablation-CAM (salience.methods.scorecam): pytorch-grad-cam's ScoreCAM and AblationCAM
before their min-max scaling, the papers' formulas written out here, where we differ from the peer,
the dead-channel shortcut, the repeated-image fallback, several targets, chunking, bad input."""
from __future__ import annotations

import copy

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError

from conftest import unchanged
from test_s49_record import ForwardLog


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _acts(model, layer, x):
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return store[0]


def _peer_cam(cam_class, model, layer, x, classes, **kw):
    """pytorch-grad-cam's CAM before its min-max scaling: ReLU(sum_k w_k A_k) at the layer's size."""
    ClassifierOutputTarget = pytest.importorskip("pytorch_grad_cam.utils.model_targets").ClassifierOutputTarget

    cam = cam_class(model, [layer], **kw)
    acts = _acts(model, layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = cam.get_cam_image(x, layer, [ClassifierOutputTarget(int(c)) for c in classes], acts.numpy(), None)
    return torch.from_numpy(np.maximum(raw, 0))


def test_scorecam_equals_pytorch_grad_cam_with_its_softmax_over_channels(resnet):
    ScoreCAM = pytest.importorskip("pytorch_grad_cam").ScoreCAM

    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16)
    t = torch.tensor([3, 5])
    peer = ScoreCAM  # batch size: the attribute its loop reads
    ref = _peer_cam(type("Peer", (peer,), {"batch_size": 64}), resnet, resnet.layer1, x, t)
    ours = salience.scorecam(resnet, x, t, layer="layer1", softmax="channels", align_corners=True, upsample=False)
    # the peer scales masks by (max - min + 1e-8): a relative difference of 1e-8 / span
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    # The paper weighs each channel by the class *probability* of the masked image (softmax over the
    # classes); pytorch-grad-cam by a softmax of raw scores over the *channels* (weights summing to 1,
    # so its map is a weighted mean of the channels): different maps (and the paper's is checked
    # against its formula below).
    paper = salience.scorecam(resnet, x[:1], t[:1], layer="layer1", align_corners=True, upsample=False)
    assert not torch.allclose(paper, ref[:1], rtol=0.5)


def test_scorecam_equals_the_papers_formula(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    layer = small_cnn.features[5]
    small_cnn.eval()
    acts = _acts(small_cnn, layer, x)  # (2, 8, 8, 8)
    ref = torch.zeros(2, 8, 8)
    with torch.no_grad():
        for k in range(acts.shape[1]):
            up = F.interpolate(acts[:, k:k + 1], size=(8, 8), mode="bilinear", align_corners=False)
            lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
            mask = torch.where(hi > lo, (up - lo) / (hi - lo), torch.zeros_like(up))
            w = small_cnn(x * mask).softmax(1)[:, 2]  # the class probability of the masked image
            ref += w.view(2, 1, 1) * acts[:, k]
    small_cnn.train()
    with unchanged(small_cnn):
        ours = salience.scorecam(small_cnn, x, 2, layer=layer)
        chunked = salience.scorecam(small_cnn, x, 2, layer=layer, chunk=3)
    torch.testing.assert_close(ours, ref.clamp(min=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, ours, atol=1e-6, rtol=1e-5)


class DeadChannels(nn.Module):
    """A conv layer with two constant channels (zero after the ReLU), and a forward counter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[:2] = 0
            self.conv.bias[:2] = -1
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)
        self.images = ForwardLog([0])  # changed in place: the guard puts back a reassigned attribute and a plain list
        self.sizes = ForwardLog()  # the batch size of every forward pass (the guard puts back a plain list)

    def forward(self, x):
        self.images[0] += x.shape[0]
        self.sizes.append(x.shape[0])
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def test_scorecam_scores_an_empty_mask_once_per_call():
    model = DeadChannels()
    x = torch.rand(3, 3, 8, 8)
    acts = _acts(model, model.act, x)
    live = int((acts.amax((2, 3)) > acts.amin((2, 3))).sum())  # at most 4 per image: 2 channels are dead
    model.images[0] = 0
    ours = salience.scorecam(model, x, torch.tensor([[0, 1]] * 3), layer="act", softmax="channels")
    # the capture pass (3 images), the memory probe's pass of its own (3: one item per image, thrown away, in a
    # model's first call only: session 45), one per live (image, channel), one zero image for all (session 46: 3)
    assert live <= 12 and model.images[0] == 3 + 3 + live + 1
    for k in range(2):  # several targets == one at a time (the dead channels weigh in the softmax)
        torch.testing.assert_close(ours[:, k], salience.scorecam(model, x, k, layer="act", softmax="channels"))


def test_scorecam_runs_every_full_chunk_at_one_batch_size():
    """The passes score live (image, channel) items only, ``chunk`` of them per pass but the last: a
    chunk of items that skipped its dead channels had a batch size of its own, and glibc kept the
    freed memory of the varying sizes (resident memory grew with the channels: issue 15,
    benchmarks/perturbation-memory.md)."""
    model = DeadChannels()
    x = torch.rand(3, 3, 8, 8)
    acts = _acts(model, model.act, x)
    live = int((acts.amax((2, 3)) > acts.amin((2, 3))).sum())
    # a given chunk; the engine's chunks, after its memory probe (a pass of one item per image, thrown away: the
    # model's first call only, session 45)
    for chunk, before in ((4, 2), (None, 3)):
        model.sizes.clear()
        ours = salience.scorecam(model, x, 1, layer="act", softmax="none", chunk=chunk)
        # after the layer's capture (3 images), the zero image (one for all: session 46) and the probe (3)
        passes = model.sizes[before:]
        assert model.sizes[:before] == [3, 1, 3][:before] and sum(passes) == live, model.sizes
        assert len(set(passes[:-1])) <= 1 and passes[0] >= passes[-1] and (chunk is None or passes[0] == chunk)
    assert chunk is None and passes == [live]  # the budget fits them in one pass
    with torch.no_grad():  # the weights: the score of each masked image (zeros for a dead channel)
        up = acts.flatten(0, 1).unsqueeze(1)
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        mask = torch.where(hi > lo, (up - lo) / (hi - lo), torch.zeros_like(up)).view(3, 6, 1, 8, 8)
        w = torch.stack([model(x[i] * mask[i])[:, 1] for i in range(3)])  # (3 images, 6 channels)
    torch.testing.assert_close(ours, torch.einsum("bk,bkhw->bhw", w, acts).clamp(min=0), atol=1e-5, rtol=1e-4)


def test_ablationcam_equals_pytorch_grad_cam(resnet):
    """In float64, so that the comparison is not of two float32 roundings (on an AVX2-only CPU, session 51, the two
    float32 maps differed by 6e-5 at a map peak of 1.0: each weight is a difference of close scores, and the batch
    size of the ablated passes changes their rounding): ours equals the paper's formula by hand to float64 rounding;
    pytorch-grad-cam rounds the scores and the weights to float32 (``np.float32`` in its ``AblationCAM``), so each of
    its weights is off by at most about ``3 * 2**-24`` (two scores of size ``|y|`` rounded, then their difference over
    ``y``, then the weight; the factor 2 for ``|y_k| / |y|``), a pixel by that times ``sum_k |A_k|`` (the peer's
    largest difference was 0.12 of the bound, 5.8e-7; ours 1.9e-14 off the reference)."""
    AblationCAM = pytest.importorskip("pytorch_grad_cam").AblationCAM

    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16)
    t = torch.tensor([3, 5])
    model = copy.deepcopy(resnet).double()
    ref = _ablation_reference(model, model.layer1, x.double(), t)
    mass = _acts(model, model.layer1, x.double()).abs().sum(1)
    ours = salience.ablationcam(model, x.double(), t, layer="layer1", upsample=False)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    peer = _peer_cam(AblationCAM, model, model.layer1, x.double(), t, batch_size=64)
    bound = 6 * 2.0 ** -24 * mass  # 3 roundings of 2**-24 each, times |y_k| / |y| < 2
    assert bool(((peer - ref).abs() <= bound + 1e-12).all()), float(((peer - ref).abs() / bound).max())
    assert float((peer - ref).abs().max()) > 0  # the peer's float32 rounding is there: the bound is the one that holds
    both = salience.ablationcam(resnet, x, torch.stack([t, t.flip(0)], 1), layer="layer1", chunk=7)
    torch.testing.assert_close(both[:, 0], salience.ablationcam(resnet, x, t, layer="layer1"), atol=1e-5, rtol=1e-4)


class SkipAround(nn.Module):
    """The rest of the model adds an earlier tensor of the batch: the ablated copies cannot run alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(5, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.head((self.block(s) + s).mean((2, 3)))


def test_ablationcam_equals_the_papers_formula_with_a_skip_around_the_layer():
    model = SkipAround().eval()
    x = torch.rand(2, 3, 8, 8)
    acts = _acts(model, model.block, x)
    with torch.no_grad():
        y = model(x)[:, 1]
        ref = torch.zeros(2, 8, 8)
        for k in range(5):  # w_k = (y - y_k) / y, y_k with channel k of the layer's output set to 0
            def zero(m, i, o, k=k):
                o = o.clone()
                o[:, k] = 0
                return o
            h = model.block.register_forward_hook(zero)
            yk = model(x)[:, 1]
            h.remove()
            ref += ((y - yk) / y).view(2, 1, 1) * acts[:, k]
    ours = salience.ablationcam(model, x, 1, layer="block")
    torch.testing.assert_close(ours, ref.clamp(min=0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [salience.scorecam, salience.ablationcam])
def test_bad_input(method, small_cnn):
    x = torch.rand(1, 3, 8, 8)
    with unchanged(small_cnn):
        with pytest.raises(SalienceError, match="map|tokens"):  # a layer without channels
            method(small_cnn, x, 0, layer="head")
        with pytest.raises(SalienceError, match="inner layer"):
            method(small_cnn, x, salience.targets.activation("features.3", 0), layer="features.5")
        with pytest.raises(SalienceError, match="softmax"):
            method(small_cnn, x, 0, layer="features.5", softmax="bad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(small_cnn.eval())
    with pytest.raises(SalienceError, match="TorchScript"):
        method(scripted, x, 0)


def test_ablationcam_refuses_a_score_of_zero_instead_of_a_map_of_nan(small_cnn):
    """``w_k = (S - S_k) / S`` is 0 / 0 where the clean score ``S`` is 0: a fresh torchvision
    VisionTransformer (its head initialized to zeros) gave a map of NaN with no word. Now a
    SalienceError names the image and says what to do; class probabilities (never 0) still work."""
    with torch.no_grad():
        small_cnn.head.weight[2] = 0
        small_cnn.head.bias[2] = 0  # class 2's score is exactly 0 on every image
    x = torch.rand(2, 3, 8, 8)
    with unchanged(small_cnn), pytest.raises(SalienceError, match=r"score of class 2 is 0 on image 0.*softmax='classes'"):
        salience.ablationcam(small_cnn, x, 2, layer="features.5")
    with pytest.raises(SalienceError, match="is 0 on image 0"):  # one of several targets
        salience.ablationcam(small_cnn, x, torch.tensor([[1, 2], [1, 2]]), layer="features.5")
    m = salience.ablationcam(small_cnn, x, 2, layer="features.5", softmax="classes")
    assert m.shape == (2, 8, 8) and bool(torch.isfinite(m).all())


class InputSkip(nn.Module):
    """The head reads ``x`` again after the layer: a skip from the input around the whole network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(3, 3)
        self.side = nn.Linear(3, 3)

    def forward(self, x):
        a = self.act(self.conv(x))
        return self.head(a.mean((2, 3))) + self.side(x.mean((2, 3)))


class UsesXTwice(nn.Module):
    """The forward reads ``x`` twice: the layer's output is gated by another function of ``x``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        a = self.conv(x).relu()
        return self.head((a * torch.sigmoid(self.gate(x))).mean((2, 3)))


class ReadsOnlyTheLayer(nn.Module):
    """Nothing after the layer but its output: the layers before may run once per image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def _ablation_reference(model, layer, x, cls):
    """Desai & Ramaswamy 2020 (``cls``: an int, or a tensor of each image's class), one image and one channel at a time: ``w_k = (y - y_k) / y``, ``y_k`` the score
    with channel ``k`` of the layer's output set to 0; the map ``ReLU(sum_k w_k A_k)`` at the layer's size."""
    maps = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            a = _acts(model, layer, xi)[0]
            c = int(cls[i]) if isinstance(cls, torch.Tensor) else cls  # one class, or each image's
            y = model(xi)[0, c]
            cam = torch.zeros(a.shape[1:], dtype=a.dtype)
            for k in range(a.shape[0]):
                def zero(m, inp, o, k=k):
                    o = o.clone()
                    o[:, k] = 0
                    return o
                h = layer.register_forward_hook(zero)
                yk = model(xi)[0, c]
                h.remove()
                cam += (y - yk) / y * a[k]
            maps.append(cam.clamp(min=0))
    return torch.stack(maps)


@pytest.mark.parametrize("make", [InputSkip, UsesXTwice, ReadsOnlyTheLayer])
def test_ablationcam_equals_the_papers_formula_per_image_whatever_the_chunk(make):
    """The layers before the layer ran once per distinct image of a chunk, and the ablated rows were matched to
    the images by position: when the rest of the model reads ``x`` again (a skip from the input, a forward that
    uses ``x`` twice) and a chunk held as many items as distinct images, in another order (chunk=3 on 4 images:
    items 3, 4, 5 are images 3, 0, 1), the rows met another image's ``x``: a wrong map, with no error."""
    model = make().eval()
    for b in (1, 2, 3, 4):
        x = torch.rand(b, 3, 6, 6, generator=torch.Generator().manual_seed(b)) - 0.3
        ref = _ablation_reference(model, model.conv, x, 1)
        for chunk in [None, *range(1, 3 * b + 2)]:
            with unchanged(model):
                ours = salience.ablationcam(model, x, 1, layer=model.conv, upsample=False, chunk=chunk)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"b={b} chunk={chunk}: {m}")


class NaNWhenAblated(nn.Module):
    """Channel 1 of the layer is 5 everywhere; the score is ``log(mean(A_1) - mean(x))``: ablating channel 1 gives
    ``log(-mean(x))``, NaN on an image whose mean is positive (and only there)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.fill_(0.1)
            self.conv.weight[1] = 0
            self.conv.bias.zero_()
            self.conv.bias[1] = 5

    def forward(self, x):
        a = self.conv(x).mean((2, 3))
        s = torch.log(a[:, 1] - x.mean((1, 2, 3)))
        return torch.stack([s, a[:, 0] + s], 1)


def test_ablationcam_names_the_image_whose_ablated_score_is_nan_whatever_the_chunk():
    model = NaNWhenAblated().eval()
    x = -torch.rand(4, 3, 4, 4)
    x[2] = -x[2]  # image 2 only: positive mean
    for chunk in (1, 2, 3, 4, 5, 7, 12):
        with pytest.raises(SalienceError, match=r"NaN or infinite \(image 2 of 4, class 0\)"):
            salience.ablationcam(model, x, 0, layer=model.conv, chunk=chunk)


class InfOnBlack(DeadChannels):
    """:class:`DeadChannels` whose class 1 scores infinite on an all-zero image (a division by its pixels' sum)."""

    def forward(self, x):
        out = super().forward(x)
        lit = (x.flatten(1).abs().sum(1) > 0).float()
        return torch.cat([out[:, :1], out[:, 1:2] / lit[:, None], out[:, 2:]], 1)


def test_scorecam_refuses_an_empty_masks_infinite_score_naming_the_image():
    """A dead channel's empty mask is scored once, on all-zero images, before the engine's passes: that pass ran
    outside the call's deferred checks, so an infinite score there gave a map of NaN with no word."""
    model = InfOnBlack().eval()
    x = torch.rand(3, 3, 8, 8)
    with unchanged(model), pytest.raises(SalienceError, match=r"NaN or infinite \(image 0 of 3, class 1\)"):
        salience.scorecam(model, x, torch.tensor([1, 2, 2]), layer="act", softmax="none")
    m = salience.scorecam(model, x, torch.tensor([0, 2, 2]), layer="act", softmax="none")
    assert bool(torch.isfinite(m).all())


class TakesBFromX(nn.Module):
    """``b = x.shape[0]`` at the top, then a spatial softmax over ``reshape(b, c, -1)`` reshaped back by the
    layer's shape: with b rows before the layer and the items' n after it, the softmax runs over several items'
    positions at once (no error, n rows out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        b = x.shape[0]
        h = self.conv(x)
        att = h.reshape(b, h.shape[1], -1).softmax(-1).reshape(h.shape)
        return self.head((h * att).sum((2, 3)))


class ChecksTheBatch(nn.Module):
    """The model checks its batch sizes itself (a ValueError, not a RuntimeError) after the layer."""

    def __init__(self, kind=ValueError):
        super().__init__()
        torch.manual_seed(9)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        h = self.conv(x).relu()
        if h.shape[0] != x.shape[0]:
            raise self.kind("the batch sizes differ")
        return self.head(h.mean((2, 3))) + x.mean((1, 2, 3))[:, None]


@pytest.mark.parametrize("make", [TakesBFromX, ChecksTheBatch, lambda: ChecksTheBatch(AssertionError)])
def test_ablationcam_equals_the_papers_formula_where_the_rest_takes_the_batch_size_from_x(make):
    """The shared layers' b rows against the items' n: a rest that reshapes by ``x.shape[0]`` mixed the items'
    rows with no error (a wrong map at the default chunk, even for one image), and a model that checks the batch
    sizes itself (ValueError, assert) failed the call where a pass per item works."""
    model = make().eval()
    for b in (1, 2, 3):
        x = torch.rand(b, 3, 6, 6, generator=torch.Generator().manual_seed(b)) + 0.1
        ref = _ablation_reference(model, model.conv, x, 1)
        for chunk in (None, 1, b, b + 1, 2 * b, 4 * b):
            with unchanged(model):
                ours = salience.ablationcam(model, x, 1, layer=model.conv, upsample=False, chunk=chunk)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"b={b} chunk={chunk}: {m}")


class FailsAfterTheLayer(nn.Module):
    """The model's own error on an ablated channel (a whole channel of zeros), whatever the batch's rows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        if bool((h == 0).all(3).all(2).any()):
            raise ValueError("the model's own error")
        return h.mean((2, 3))


def test_ablationcam_lets_the_models_own_error_through():
    """The shared pass's failure is not taken for the rows' mismatch only: the pass per item raises it again."""
    model = FailsAfterTheLayer().eval()
    with pytest.raises(ValueError, match="the model's own error"):
        salience.ablationcam(model, torch.rand(2, 3, 6, 6), 1, layer=model.conv, chunk=8)


class NaNWhenRowsDiffer(nn.Module):
    """Finite per image; NaN scores when the layer's rows are not ``x``'s (a rest that mixes them overflows)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x).relu()
        y = self.head(h.mean((2, 3)))
        return y if h.shape[0] == x.shape[0] else y * float("nan")


def test_ablationcam_a_shared_pass_thrown_away_refuses_nothing():
    """The shared pass's NaN scores, replaced by the pass per item's, were still noted: the call was refused
    ("NaN or infinite (images 0, 1 of 2)") where every score it uses is finite."""
    model = NaNWhenRowsDiffer().eval()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    ref = _ablation_reference(model, model.conv, x, 1)
    for chunk in (None, 3, 4):
        torch.testing.assert_close(salience.ablationcam(model, x, 1, layer=model.conv, upsample=False, chunk=chunk),
                                   ref, atol=1e-5, rtol=1e-4)
