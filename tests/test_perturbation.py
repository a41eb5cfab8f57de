"""Occlusion and RISE (salience.methods.perturbation): Captum's Occlusion, closed forms on a linear
model, RISE against the paper's formula written out here with the same masks, chunking, several
targets, TorchScript, memory, and bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError
from salience._core.engine import MemoryProbe
from salience._core.tensors import gaussian_blur
from salience.methods.perturbation import rise_masks

from conftest import unchanged


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


class Linear(nn.Module):
    """``f(x) = W x + b`` on the flattened image: occlusion has a closed form."""

    def __init__(self, shape=(3, 8, 8), classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(int(torch.tensor(shape).prod()), classes)

    def forward(self, x):
        return self.lin(x.flatten(1))


# ----------------------------------------------------------------------------------- occlusion


def test_occlusion_equals_captum(resnet):
    Occlusion = pytest.importorskip("captum.attr").Occlusion

    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16)
    t = torch.tensor([3, 7])
    ref = Occlusion(resnet).attribute(x, sliding_window_shapes=(3, 6, 6), strides=(3, 5, 5), target=t,
                                      baselines=0.25, perturbations_per_eval=64)
    ours = salience.occlusion(resnet, x, t, window=6, stride=5, baseline=0.25, reduce=None)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # a tensor baseline (the blurred image), and the signed (B, H, W) map of the default reduction
    blur = gaussian_blur(x, 2.0)
    ref = Occlusion(resnet).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), target=t,
                                      baselines=blur, perturbations_per_eval=64)
    ours = salience.occlusion(resnet, x, t, window=8, stride=8, baseline=blur)
    torch.testing.assert_close(ours, ref[:, 0], atol=1e-6, rtol=1e-5)


def test_occlusion_of_a_linear_model_is_its_closed_form():
    model = Linear()
    x = torch.rand(2, 3, 8, 8)
    w = model.lin.weight[1].view(3, 8, 8)
    # one pixel at a time: the drop is sum_c w_c x_c there
    ours = salience.occlusion(model, x, 1, window=1, stride=1)
    torch.testing.assert_close(ours, (w * x).sum(1), atol=1e-5, rtol=1e-5)
    # 2 x 2 tiles: each pixel gets its tile's sum of w x; with baseline b, of w (x - b)
    ours = salience.occlusion(model, x, 1, window=2, stride=2, baseline=0.5)
    tiles = nn.functional.avg_pool2d((w * (x - 0.5)).sum(1, keepdim=True), 2) * 4
    torch.testing.assert_close(ours, nn.functional.interpolate(tiles, scale_factor=2)[:, 0], atol=1e-5, rtol=1e-5)


def test_occlusion_several_targets_chunks_and_torchscript():
    model = Linear()
    x = torch.rand(2, 3, 8, 8)
    both = salience.occlusion(model, x, torch.tensor([[0, 2], [1, 2]]), window=3, stride=2, chunk=5)
    for k, t in enumerate([torch.tensor([0, 1]), 2]):
        torch.testing.assert_close(both[:, k], salience.occlusion(model, x, t, window=3, stride=2), atol=1e-6,
                                   rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    torch.testing.assert_close(salience.occlusion(scripted, x, 1, window=3, stride=2),
                               salience.occlusion(model, x, 1, window=3, stride=2))


@pytest.mark.parametrize("options, match", [
    (dict(window=9), "larger than the 8x8 image"),
    (dict(window=(2, 9)), "larger than the 8x8 image"),
    (dict(window=4, stride=10), "stride 10x10 is larger"),
    (dict(window=0), "window"),
    (dict(baseline="mean"), "baseline"),
    (dict(baseline=torch.zeros(5, 5)), "broadcast"),
    (dict(reduce="bad"), "reduce"),
    (dict(softmax="bad"), "softmax"),
])
def test_occlusion_bad_input(options, match):
    model = Linear()
    with unchanged(model), pytest.raises(SalienceError, match=match):
        salience.occlusion(model, torch.rand(1, 3, 8, 8), 0, **options)


# ----------------------------------------------------------------------------------- RISE


def test_rise_masks_do_not_depend_on_the_chunking():
    whole = rise_masks(0, 10, (20, 24), cell=5, p=0.3, seed=4)
    parts = torch.cat([rise_masks(0, 3, (20, 24), cell=5, p=0.3, seed=4), rise_masks(3, 10, (20, 24), cell=5, p=0.3,
                                                                                      seed=4)])
    assert torch.equal(whole, parts) and whole.shape == (10, 20, 24)
    assert 0 <= whole.min() and whole.max() <= 1
    assert not torch.equal(whole, rise_masks(0, 10, (20, 24), cell=5, p=0.3, seed=5))


def test_rise_equals_the_papers_formula_with_the_same_masks(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    n, p = 12, 0.4
    masks = rise_masks(0, n, (8, 8), cell=3, p=p, seed=7)
    t = torch.tensor([1, 3])
    ref = torch.zeros(2, 8, 8)
    with torch.no_grad():
        small_cnn.eval()
        for m in masks:  # S_i = P(class | x * M_i); saliency = sum_i S_i M_i / (N p)
            probs = small_cnn(x * m).softmax(1)
            ref += probs[torch.arange(2), t].view(2, 1, 1) * m
    ref /= n * p
    small_cnn.train()
    with unchanged(small_cnn):
        ours = salience.rise(small_cnn, x, t, masks=n, cell=3, p=p, seed=7)
        chunked = salience.rise(small_cnn, x, t, masks=n, cell=3, p=p, seed=7, chunk=5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, ours, atol=1e-6, rtol=1e-5)
    # several targets share the passes and equal one at a time; raw scores with softmax="none"
    both = salience.rise(small_cnn, x, [1, None], masks=n, cell=3, p=p, seed=7, softmax="none")
    pred = small_cnn.eval()(x).argmax(1)
    torch.testing.assert_close(both[:, 1], salience.rise(small_cnn, x, pred, masks=n, cell=3, p=p, seed=7,
                                                         softmax="none"), atol=1e-6, rtol=1e-5)


def test_rise_memory_does_not_grow_with_the_masks(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    peaks = []
    for n in (4, 24):
        with MemoryProbe() as probe:
            salience.rise(small_cnn, x, 0, masks=n, cell=2, chunk=4)
        peaks.append(probe.peak)
    assert peaks[1] <= 1.1 * peaks[0], peaks


@pytest.mark.parametrize("options, match", [
    (dict(masks=0), "masks"),
    (dict(p=0.0), "p must be in"),
    (dict(cell=0), "cell"),
    (dict(cell=40), "more cells"),
    (dict(softmax="channels"), "softmax"),
])
def test_rise_bad_input(small_cnn, options, match):
    with unchanged(small_cnn), pytest.raises(SalienceError, match=match):
        salience.rise(small_cnn, torch.rand(1, 3, 8, 8), 0, **options)


def test_layer_targets_are_refused(small_cnn):
    t = salience.targets.activation("features.3", 0)
    for fn in (salience.rise, salience.occlusion):
        with pytest.raises(SalienceError, match="inner layer"):
            fn(small_cnn, torch.rand(1, 3, 8, 8), t)


@pytest.mark.parametrize("shape", ["one logit", "vector"])
def test_rise_of_a_binary_classifier_scores_its_probability(small_cnn, shape):
    """A binary classifier with one logit ``(B, 1)`` (or a ``(B,)`` output): ``softmax="auto"`` (and
    ``"classes"``) score its probability, the sigmoid of the logit, in the paper's formula with
    ``S = sigmoid(f(x * M_i))`` written out; ``softmax="none"`` the raw logit. The softmax of a single
    output is 1 for every masked image, so the default map was ``sum_i M_i / (N p)``: the masks'
    mean, the same whatever the model. A ``(B,)`` output was an error under the default."""
    head = nn.Linear(8, 1)
    model = nn.Sequential(small_cnn.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    if shape == "vector":
        model.append(nn.Flatten(0))
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    n, p = 12, 0.4
    masks = rise_masks(0, n, (8, 8), cell=3, p=p, seed=7)
    ref, raw = torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)
    with torch.no_grad():
        for m in masks:
            logit = model(x * m).reshape(2, 1, 1)
            ref += logit.sigmoid() * m
            raw += logit * m
    ref /= n * p
    raw /= n * p
    with unchanged(model):
        ours = salience.rise(model, x, 0, masks=n, cell=3, p=p, seed=7)
        classes = salience.rise(model, x, 0, masks=n, cell=3, p=p, seed=7, softmax="classes")
        none = salience.rise(model, x, 0, masks=n, cell=3, p=p, seed=7, softmax="none")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(classes, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(none, raw, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, masks.sum(0) / (n * p))


def test_scorecam_of_a_binary_classifier_weighs_the_channels_by_the_probability():
    """Score-CAM on a one-logit model: the weights are the sigmoid of the logit of each masked image
    (the formula written out), not the softmax of one output (1 for every channel: the map was the
    channels' sum)."""
    torch.manual_seed(0)
    conv, head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 1)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        acts = model[1](conv(x))  # (B, 4, 8, 8): the layer's output, already the image's size
        lo, hi = acts.amin((2, 3), keepdim=True), acts.amax((2, 3), keepdim=True)
        masks = (acts - lo) / (hi - lo)
        w = torch.stack([model(x * masks[:, k:k + 1]).squeeze(1) for k in range(4)], dim=1)  # (B, 4)
        ref = (w.sigmoid()[:, :, None, None] * acts).sum(1).clamp(min=0)
    ours = salience.scorecam(model, x, 0, layer=model[1])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, acts.sum(1).clamp(min=0))


@pytest.fixture
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _documented_masks(n, size, cell, p, seed):
    """RISE masks by the construction rise_masks documents, written out with float32 draws."""
    h, w = size
    ch, cw = -(-h // cell), -(-w // cell)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        grid = (torch.rand(cell, cell, generator=g, dtype=torch.float32) < p).float()
        dy, dx = int(torch.randint(0, ch, (1,), generator=g)), int(torch.randint(0, cw, (1,), generator=g))
        up = F.interpolate(grid[None, None], size=((cell + 1) * ch, (cell + 1) * cw), mode="bilinear",
                           align_corners=False)[0, 0]
        out.append(up[dy:dy + h, dx:dx + w])
    return torch.stack(out)


def test_rise_masks_do_not_depend_on_the_default_dtype(small_cnn, request):
    """Mask ``i`` is a function of ``(seed, i)`` only: its cells are drawn in float32 whatever
    ``torch.set_default_dtype`` says (under float64 the draws were other numbers: other masks, and a
    float32 model's RISE map changed by a tenth of its range with a global setting)."""
    x = torch.rand(2, 3, 8, 8)
    small_cnn.eval()
    expected = _documented_masks(6, (8, 8), 3, 0.4, 7)
    assert torch.equal(rise_masks(0, 6, (8, 8), cell=3, p=0.4, seed=7), expected)
    ours = salience.rise(small_cnn, x, 1, masks=6, cell=3, p=0.4, seed=7)
    request.getfixturevalue("default_float64")
    assert torch.equal(rise_masks(0, 6, (8, 8), cell=3, p=0.4, seed=7), expected)
    torch.testing.assert_close(salience.rise(small_cnn, x, 1, masks=6, cell=3, p=0.4, seed=7), ours, atol=1e-6,
                               rtol=1e-5)


# ------------------------------------------------- one scale of probabilities per call (all four methods)
class _Stack(nn.Module):
    """The layer the CAMs read: the image as channel 0 and a constant channel of ones (a channel that
    masks Score-CAM's image to zeros, and whose ablation changes nothing)."""

    def forward(self, x):
        return torch.cat([x, torch.ones_like(x)], 1)


class _BiasedScores(nn.Module):
    """Raw scores ``[1 + s, 2 s]``, ``s`` the sum of the image (channel 0 of ``feat``): the class-1
    probability is ``sigmoid(s - 1)``, and a blank image gives ``[1, 0]``, a row that is non-negative
    and sums to 1 though it is no probability. ``soft``: a final softmax (the model's own probabilities)."""

    def __init__(self, soft=False):
        super().__init__()
        self.feat = _Stack()
        self.head = nn.Softmax(1) if soft else nn.Identity()

    def forward(self, x):
        s = self.feat(x)[:, 0].flatten(1).sum(1)
        return self.head(torch.stack([1 + s, 2 * s], 1))


def _p1(s):
    """The class-1 probability of the raw scores ``[1 + s, 2 s]``."""
    return torch.sigmoid(torch.as_tensor(s, dtype=torch.float32) - 1)


def _closed_form(method, x):
    """Each method's map of class 1 for :class:`_BiasedScores` on ``x`` ``(B, 1, 1, 2)``, written out."""
    s = x.flatten(1).sum(1)
    if method == "occlusion":  # window 1 x 1: pixel j's drop is S(x) - S(x with pixel j at 0)
        return (_p1(s)[:, None] - _p1(s[:, None] - x.flatten(1))).view_as(x)
    if method == "rise":  # cell 1: every mask keeps or blanks the whole image
        m = rise_masks(0, 6, (1, 2), cell=1, p=0.5, seed=0)  # (6, 1, 2)
        sm = (x.flatten(1)[:, None] * m.flatten(1)).sum(-1)  # (B, 6): s of x * M_i
        return (_p1(sm)[:, :, None, None] * m).sum(1) / (6 * 0.5)
    if method == "scorecam":  # channel 0 = x scaled to [0, 1] masks x; channel 1 is constant: a blank image
        h = (x - x.amin((2, 3), True)) / (x.amax((2, 3), True) - x.amin((2, 3), True))
        w0 = _p1((x * h).flatten(1).sum(1))
        return (w0[:, None, None] * x[:, 0] + _p1(0.0)).clamp(min=0)
    # ablationcam: without channel 0, s = 0 (the raw row [1, 0]); channel 1 changes nothing (weight 0)
    w0 = (_p1(s) - _p1(0.0)) / _p1(s)
    return (w0[:, None, None] * x[:, 0]).clamp(min=0)


_CALLS = {
    "occlusion": lambda m, x, **kw: salience.occlusion(m, x, 1, window=1, stride=1, softmax="classes",
                                                       reduce=None, **kw),
    "rise": lambda m, x, **kw: salience.rise(m, x, 1, masks=6, cell=1, p=0.5, seed=0, softmax="classes", **kw),
    "scorecam": lambda m, x, **kw: salience.scorecam(m, x, 1, layer="feat", softmax="classes", **kw),
    "ablationcam": lambda m, x, **kw: salience.ablationcam(m, x, 1, layer="feat", softmax="classes", **kw),
}


@pytest.mark.parametrize(("method", "model"), [(m, k) for m in _CALLS for k in ("raw", "softmax kept", "torchscript")
                                               if not (k == "torchscript" and m in ("scorecam", "ablationcam"))])
def test_probabilities_are_judged_once_per_call(method, model):
    """Whether the model's rows already are probabilities is judged once per call, on the clean
    images' output, and holds in every chunk. A raw model is softmaxed in every chunk, the blank
    image's row ``[1, 0]`` included (judged per chunk, a chunk of such rows would read as the
    probability 0 of class 1 while the others were softmaxed: another map with ``chunk=1``). A model
    whose output is its own probabilities (a final softmax kept, ``strip_softmax=False``, or inside a
    TorchScript model where it cannot be seen) is scored on them: they were softmaxed a second time,
    a flatter score than the model's probability (the map of occlusion about half the closed form's)."""
    # (no TorchScript case for the CAMs: they read a layer with a hook, and refuse TorchScript)
    net, kw = _BiasedScores(soft=model != "raw"), {}
    if model == "softmax kept":
        kw["strip_softmax"] = False
    elif model == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.script(net)
    x = torch.tensor([[0.5, 1.0], [0.25, 0.0]]).view(2, 1, 1, 2)  # occluding image 1's pixel 0 blanks it
    expected = _closed_form(method, x)
    for chunk in (1, None):
        with unchanged(net) if model != "torchscript" else warnings.catch_warnings():
            torch.testing.assert_close(_CALLS[method](net, x, chunk=chunk, **kw), expected)
