"""The metrics after deletion / insertion (Quantus's families): faithfulness correlation,
max-sensitivity, sparseness, complexity and the random-logit test, each on a case with a known
answer or against a hand-written reference of the paper's formula."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from salience import SalienceError
from salience import evidence as M
from salience.methods import vanilla

from conftest import unchanged
from nets import LinearScore


def _linear_case(b: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, size, size, generator=g)
    x = torch.rand(b, 1, size, size, generator=g)
    return LinearScore(w), x, (w * x)[:, 0]


# ----------------------------------------------------------------- faithfulness correlation
def test_faithfulness_correlation_known_answers():
    model, x, contrib = _linear_case()
    # With a zero substrate the drop of the raw output over a set S is exactly sum_S w * x, the
    # map's sum over S: the correlation is 1 (and -1 for the negated map), up to float32 rounding
    # of sums of 64 values of order 1 (eps 6e-8 times a few dozen: atol 1e-6).
    with unchanged(model):
        exact = M.faithfulness_correlation(model, x, contrib, target=0, substrate="zero", subsets=20)
    torch.testing.assert_close(exact, torch.ones(3), rtol=0, atol=1e-6)
    neg = M.faithfulness_correlation(model, x, -contrib, target=0, substrate="zero", subsets=20)
    torch.testing.assert_close(neg, -torch.ones(3), rtol=0, atol=1e-6)
    # A flat map has the same sum over every set of the same size: no correlation is defined.
    assert torch.isnan(M.faithfulness_correlation(model, x, torch.ones(3, 8, 8), target=0, subsets=8)).all()
    # The output's probability instead of the raw output: a sigmoid of the drop, monotone but not
    # linear, so the correlation stays positive but is no longer exactly 1: "not 1" is taken as
    # 100x the rounding allowed for the exact case above (here it is 0.70 to 0.90).
    p = M.faithfulness_correlation(model, x, contrib, target=0, substrate="zero", subsets=20, probability=True)
    assert bool((p > 0).all()) and bool((p < 1 - 100 * 1e-6).all()), p
    with pytest.raises(SalienceError, match="subsets"):
        M.faithfulness_correlation(model, x, contrib, subsets=1)


def test_faithfulness_correlation_of_two_pixels_is_the_sign_of_agreement():
    # One-pixel sets on a two-pixel image: the drops and the map's sums each take two values, so
    # their Pearson correlation over the sets is +1 when the map orders the pixels as the drops
    # do and -1 when it reverses them (Bhatt et al.'s formula, worked out by hand).
    w = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    model, x = LinearScore(w), torch.ones(2, 1, 1, 2)
    maps = torch.tensor([[[0.2, 0.9]], [[5.0, -1.0]]])
    r = M.faithfulness_correlation(model, x, maps, target=0, substrate="zero", subset_size=0.5, subsets=30)
    torch.testing.assert_close(r, torch.tensor([1.0, -1.0]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ max-sensitivity
def test_max_sensitivity_zero_for_a_map_that_does_not_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))  # vanilla map = |w[class]|
    x = torch.rand(3, 3, 8, 8)
    with unchanged(model):
        s = M.max_sensitivity(model, x, "vanilla", samples=4, radius=0.1)
    assert torch.equal(s, torch.zeros(3))


def test_max_sensitivity_of_the_identity_map_is_the_noise_norm():
    # The "map" is the image itself, so the sensitivity is max_k ||d_k|| / ||x||. With d uniform in
    # [-r, r] on n = 4096 values, ||d||^2 / n has mean r^2 / 3 and relative spread
    # sqrt(4/45) / (1/3) / sqrt(n) = 1.4 %, so each ||d_k|| is r * sqrt(n / 3) with a relative sd of
    # 0.7 %. The largest of 5 such normals lies 1.16 sd above the mean with sd 0.67 sd: the ratio
    # is 1.008 +- 0.005 (measured: 1.004, 1.007); the bounds are 5 of its sd either side.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 2))
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))

    def identity(model, x, target=None):
        return x[:, 0]

    s = M.max_sensitivity(model, x, identity, samples=5, radius=0.05)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    expected = 0.05 * span * math.sqrt(64 * 64 / 3) / x.flatten(1).norm(dim=1)
    ratio = s / expected
    assert bool(((ratio > 1.008 - 5 * 0.0047) & (ratio < 1.008 + 5 * 0.0047)).all()), ratio
    assert torch.isnan(M.max_sensitivity(model, x, lambda m, x, t=None: torch.zeros_like(x[:, 0]), samples=2)).all()
    with pytest.raises(SalienceError, match="target"):
        M.max_sensitivity(model, x, identity, target=[0, 1, 0])


# -------------------------------------------------------------------- sparseness, complexity
def test_sparseness_gini_known_values_and_reference():
    n = 64
    one = torch.zeros(1, 8, 8)
    one[0, 3, 4] = -2.0  # magnitudes count
    assert M.sparseness(one).item() == pytest.approx(1 - 1 / n)
    assert M.sparseness(torch.full((1, 8, 8), 0.3)).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isnan(M.sparseness(torch.zeros(1, 8, 8))).all()
    # Reference: the mean absolute difference form, G = sum_ij |a_i - a_j| / (2 n^2 mean(a)).
    maps = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        a = maps[i].abs().flatten().double().numpy()
        ref = np.abs(a[:, None] - a[None, :]).sum() / (2 * n * n * a.mean())
        assert M.sparseness(maps)[i].item() == pytest.approx(ref, abs=1e-6)  # float32 sums of 64 vs float64


def test_complexity_entropy_known_values_and_scipy():
    from scipy import stats  # the reference

    one = torch.zeros(2, 8, 8)
    one[:, 0, 0] = 5.0
    assert torch.equal(M.complexity(one), torch.zeros(2))
    assert M.complexity(torch.ones(1, 8, 8)).item() == pytest.approx(math.log(64))
    maps = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = M.complexity(maps)
    for i in range(3):
        # float32 p * log p over 36 values (entropy ~ 3.4) against scipy's float64: a few ulp of 3.4 each
        assert ours[i].item() == pytest.approx(stats.entropy(maps[i].abs().flatten().numpy()), abs=1e-5)


# --------------------------------------------------------------------------- random logit
def test_random_logit_two_classes_and_a_class_blind_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))  # vanilla map of class k = |w_k|
    x = torch.rand(3, 3, 16, 16)
    with unchanged(model):
        s = M.random_logit(model, x, vanilla, target=0)
    # Two classes: the "random other class" is always class 1.
    w = model[1].weight.detach().view(2, 3, 16, 16).abs().amax(1)
    expected = M.ssim(w[:1].expand(3, 16, 16), w[1:].expand(3, 16, 16))
    torch.testing.assert_close(s, expected)
    sp = M.random_logit(model, x, vanilla, target=[0, 1, 0], kind="spearman_abs")
    torch.testing.assert_close(sp, M.spearman(w[[0, 1, 0]], w[[1, 0, 1]]))

    def class_blind(model, x, target=None):
        return x.mean(1)

    torch.testing.assert_close(M.random_logit(model, x, class_blind), torch.ones(3))
    with pytest.raises(SalienceError, match="kind"):
        M.random_logit(model, x, vanilla, kind="nope")


def test_random_logit_draws_another_class_uniformly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(400, 3, 4, 4)
    seen = []

    def record(model, x, target=None):
        seen.append(target.clone())
        return x.mean(1)

    M.random_logit(model, x, record, target=2, batch_size=400)
    own, other = seen
    assert bool((own == 2).all()) and bool((other != 2).all())
    counts = torch.bincount(other, minlength=5)
    # 400 draws over the 4 other classes: 100 each, binomial sd sqrt(400 * 1/4 * 3/4) = 8.7
    assert counts[2] == 0 and bool(((counts[[0, 1, 3, 4]] - 100).abs() < 4 * 8.7).all()), counts


# ------------------------------------------------------------------------- model-free baselines
def test_sobel_edges_equal_scipy_and_center_is_a_centred_gaussian():
    from scipy import ndimage  # the reference

    img = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(4))
    ours = M.sobel_edges(img)
    for i in range(2):
        g = img[i].mean(0).double().numpy()
        ref = np.hypot(ndimage.sobel(g, axis=1, mode="nearest"), ndimage.sobel(g, axis=0, mode="nearest"))
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=1e-5, atol=1e-6)  # float32 vs scipy's float64
    # A flat image has no edge: exactly 0 (not the 6e-08 of a 3x3 convolution's rounding, which is no
    # longer a constant map: salience evaluate's check of a flat baseline missed it).
    grey = ((torch.full((1, 3, 16, 16), 0.5) - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    assert torch.equal(M.sobel_edges(grey), torch.zeros(1, 16, 16))
    # and no spectral residual: 0 (it was the spectrum's rounding noise scaled to [0, 1]); the image
    # beside it keeps its map, as computed alone
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    both = M.spectral_residual(torch.cat([grey, noise]))
    assert torch.equal(both[0], torch.zeros(16, 16)) and float(both[1].max()) == 1.0
    torch.testing.assert_close(both[1:], M.spectral_residual(noise))
    c = M.center_maps(torch.zeros(1, 3, 8, 8), sigma=0.25)
    assert c.shape == (1, 8, 8) and torch.equal(c, c.flip(1)) and torch.equal(c, c.flip(2))
    # pixel (3, 3) is 0.0625 of the side from the centre in each direction: exp(-(2 * 0.0625^2) / (2 * 0.25^2))
    assert c[0, 3, 3].item() == pytest.approx(math.exp(-0.0625), rel=1e-6)


@pytest.mark.parametrize("subset_size", [0, -0.1, 1.5, 2.0, float("nan"), "big"])
def test_faithfulness_correlation_refuses_a_subset_size_outside_0_1(subset_size):
    """``subset_size`` is a fraction of the pixels: 2.0 removed every pixel in every set (drops that
    do not vary: NaN with no word), 0 and negatives one pixel, NaN and text raised raw ValueErrors."""
    model, x, contrib = _linear_case(2)
    with pytest.raises(SalienceError, match=r"subset_size must be .*in \(0, 1\]"):
        M.faithfulness_correlation(model, x, contrib, target=0, subsets=4, subset_size=subset_size)


@pytest.mark.parametrize("tolerance", [-1, float("nan"), "15px"])
def test_pointing_game_refuses_a_tolerance_that_is_no_distance(tolerance):
    maps, masks = torch.rand(2, 8, 8), torch.rand(2, 8, 8) > 0.5
    with pytest.raises(SalienceError, match="tolerance must be a finite number >= 0"):
        M.pointing_game(maps, masks, tolerance=tolerance)


def test_seeded_draws_do_not_depend_on_the_default_dtype():
    """The random baseline and faithfulness correlation's pixel sets are functions of the seed,
    drawn in float32 whatever ``torch.set_default_dtype`` says (under float64 they were other maps
    and other sets, so a seeded evaluation changed with a global setting)."""
    model, x, maps = _linear_case()
    expected = torch.rand((2, 5, 5), generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    rand = M.random_maps((2, 5, 5), seed=3)
    corr = M.faithfulness_correlation(model, x, maps, subsets=5, subset_size=0.2, seed=4)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(M.random_maps((2, 5, 5), seed=3), expected)
        again = M.faithfulness_correlation(model, x, maps, subsets=5, subset_size=0.2, seed=4)
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(rand, expected)
    torch.testing.assert_close(again, corr, atol=1e-6, rtol=1e-5)


def test_a_one_channel_map_is_the_same_map_as_its_squeezed_form():
    # A method returning its signed map as (B, 1, H, W) names the same map as (B, H, W): the maps'
    # metrics read it so (check_maps squeezes), and so must the method's. It was reduced by the
    # channels' largest magnitude, i.e. made |map|. Map of class k: sign(k - 0.5) * x, so the
    # signed maps of the two classes have Spearman -1 and their magnitudes +1.
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 6 * 6, 2))
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.1

    def signed(model, x, target):
        return x * (2.0 * target.view(-1, 1, 1, 1) - 1)  # (B, 1, H, W)

    for kind, expected in (("spearman", -1.0), ("spearman_abs", 1.0)):
        s = M.random_logit(model, x, signed, target=[0, 1, 0], kind=kind)
        torch.testing.assert_close(s, torch.full((3,), expected))
        s3 = M.random_logit(model, x, lambda m, x, t: signed(m, x, t)[:, 0], target=[0, 1, 0], kind=kind)
        torch.testing.assert_close(s3, s)


def test_method_tests_take_class_targets_only_and_say_so():
    # max_sensitivity and random_logit explain one class per image. classes(...) / predicted() are
    # those classes; a multilabel set, a function, a string or a bool is refused with a
    # SalienceError (they raised a raw RuntimeError / TypeError, and True was read as class 1).
    from salience import targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))  # vanilla map of class k = |w_k|
    x = torch.rand(3, 3, 4, 4)
    s = M.random_logit(model, x, vanilla, targets.classes(2), kind="spearman_abs", seed=3)
    torch.testing.assert_close(s, M.random_logit(model, x, vanilla, 2, kind="spearman_abs", seed=3))
    assert bool((s < 1).all())  # another class's |w| was drawn
    pred = model(x).argmax(1)
    torch.testing.assert_close(M.random_logit(model, x, vanilla, targets.predicted(), seed=3),
                               M.random_logit(model, x, vanilla, pred, seed=3))
    torch.testing.assert_close(M.max_sensitivity(model, x, vanilla, targets.classes([0, 1, 2]), samples=2),
                               torch.zeros(3))  # a linear model's map does not move
    for bad in (targets.multilabel([0, 1]), lambda out: out[:, 0], "2", True, [True, False, True]):
        with pytest.raises(SalienceError, match="target must be"):
            M.random_logit(model, x, vanilla, bad)
        with pytest.raises(SalienceError, match="target must be"):
            M.max_sensitivity(model, x, vanilla, bad, samples=2)


def test_smoothgrad_sensitivity_is_the_inputs_not_its_noise_and_not_the_batches():
    # SmoothGrad drew one noise stream per call, so an image's map (and its noisy copies' maps)
    # changed with batch_size and with the image's place in the call, and max-sensitivity measured
    # SmoothGrad's sampling noise: 0.31 at batch_size 1 and 0.95 at 3 on demo:shapes. Each image,
    # and each of its perturbed copies, now draws from the image's own stream: with radius 0 the
    # input does not change, so the map does not either (0 exactly), whatever batch_size.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(3, 3, 8, 8)
    kw = dict(samples=4, noise=0.2)
    for bs in (1, 2, 3, 32):
        s0 = M.max_sensitivity(model, x, "smoothgrad", samples=2, radius=0.0, batch_size=bs, method_kwargs=kw)
        torch.testing.assert_close(s0, torch.zeros(3), atol=1e-6, rtol=0)
    runs = [(M.max_sensitivity(model, x, "smoothgrad", samples=2, batch_size=bs, method_kwargs=kw),
             M.random_logit(model, x, "smoothgrad", batch_size=bs, method_kwargs=kw)) for bs in (1, 2, 3)]
    for ms, rl in runs[1:]:
        torch.testing.assert_close(ms, runs[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(rl, runs[0][1], atol=1e-5, rtol=0)


def test_a_method_map_with_nan_is_an_error_not_a_nan_metric():
    # max_sensitivity returned NaN for the image (documented only for a zero map) and random_logit
    # failed with "a contain NaN or infinite values"; evaluate could not tell the method apart.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(3, 3, 4, 4)

    def broken(model, x, target=None):
        m = x.mean(1).clone()
        m[-1, 0, 0] = float("nan")  # the last image of every call
        return m

    with pytest.raises(SalienceError, match=r"NaN or infinite values \(image 2\)"):
        M.max_sensitivity(model, x, broken, samples=2, batch_size=8)
    with pytest.raises(SalienceError, match=r"NaN or infinite values \(image 2, the map of its class \d\)"):
        M.random_logit(model, x, broken)
