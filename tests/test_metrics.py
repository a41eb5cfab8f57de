"""salience.metrics: localization, deletion/insertion, similarity, randomization, baselines.

Every metric is checked on a case with a known answer: perfect maps, chance-level random maps,
a linear model whose pixel contributions are known exactly, independent references (scipy).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from salience import SalienceError
from salience import evidence as M
from salience.evidence.localization import _largest_component
from salience.evidence.sanity import _step_seed
from salience.evidence.compare import _average_ranks
from salience.methods import vanilla

from conftest import unchanged
from nets import LinearScore


# --------------------------------------------------------------------------- helpers


def _rect_masks(b: int, h: int, w: int, top: int, left: int, hh: int, ww: int) -> torch.Tensor:
    m = torch.zeros(b, h, w, dtype=torch.bool)
    m[:, top:top + hh, left:left + ww] = True
    return m


class PixelLinear(nn.Module):
    """A linear classifier on the flattened pixels: its vanilla map is ``|w[class]|``."""

    def __init__(self, c: int = 3, h: int = 8, w: int = 8, k: int = 4):
        super().__init__()
        self.fc = nn.Linear(c * h * w, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


# --------------------------------------------------------------------------- pointing game


def test_pointing_game_perfect_chance_and_tolerance():
    masks = _rect_masks(3, 16, 16, 4, 4, 4, 8)  # area 32 / 256 = 1/8
    assert torch.equal(M.pointing_game(masks.float(), masks), torch.ones(3))
    # A flat map ties everywhere: it scores exactly the area fraction (chance), not 0 or 1.
    assert torch.allclose(M.pointing_game(torch.ones(3, 16, 16), masks), torch.full((3,), 1 / 8))
    # A maximum two pixels right of the mask: a miss, a hit with tolerance 2, a miss with 1.9.
    maps = torch.zeros(1, 16, 16)
    maps[0, 5, 13] = 1.0  # mask columns are 4..11
    assert M.pointing_game(maps, masks[:1]).item() == 0.0
    assert M.pointing_game(maps, masks[:1], tolerance=2).item() == 1.0
    assert M.pointing_game(maps, masks[:1], tolerance=1.9).item() == 0.0
    # A diagonal distance of sqrt(2) * 2 = 2.83: hit at 2.9, miss at 2.8 (Euclidean radius).
    maps = torch.zeros(1, 16, 16)
    maps[0, 9, 13] = 1.0  # mask rows 4..7: two rows and two columns away
    assert M.pointing_game(maps, masks[:1], tolerance=2.9).item() == 1.0
    assert M.pointing_game(maps, masks[:1], tolerance=2.8).item() == 0.0


def test_pointing_game_random_maps_score_at_chance():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4000, 12, 12, generator=g) < 0.3
    frac = masks.float().mean().item()
    score = M.pointing_game(M.random_maps((4000, 12, 12), seed=1), masks).mean().item()
    assert abs(score - frac) < 0.03, (score, frac)


def test_pointing_game_empty_mask_is_nan_and_bad_input():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[1, 2, 2] = True
    out = M.pointing_game(torch.rand(2, 8, 8), masks)
    assert math.isnan(out[0].item()) and not math.isnan(out[1].item())
    with pytest.raises(SalienceError, match="do not match"):
        M.pointing_game(torch.rand(2, 8, 8), masks[:, :4])
    with pytest.raises(SalienceError, match=r"\(B, H, W\)"):
        M.pointing_game(torch.rand(2, 3, 8, 8), masks)
    # (B, K, H, W) is also the maps of K targets: reducing them (the only hint given) mixed classes.
    with pytest.raises(SalienceError, match=r"maps\[:, k\] with target\[:, k\]"):
        M.deletion(nn.Flatten(), torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8), torch.tensor([[0, 1, 2], [3, 4, 0]]))
    with pytest.raises(SalienceError, match="boolean"):
        M.pointing_game(torch.rand(2, 8, 8), torch.rand(2, 8, 8))


# --------------------------------------------------------------------------- energy


def test_energy_in_mask_known_values():
    masks = _rect_masks(2, 8, 8, 0, 0, 4, 8)  # top half
    assert torch.allclose(M.energy_in_mask(masks.float(), masks), torch.ones(2))
    maps = torch.zeros(2, 8, 8)
    maps[:, :4] = 1.0
    maps[:, 4:] = 3.0  # inside 32, outside 96
    assert torch.allclose(M.energy_in_mask(maps, masks), torch.full((2,), 0.25))
    # Negative values count for nothing by default, by magnitude with absolute=True.
    maps[:, 4:] = -3.0
    assert torch.allclose(M.energy_in_mask(maps, masks), torch.ones(2))
    assert torch.allclose(M.energy_in_mask(maps, masks, absolute=True), torch.full((2,), 0.25))
    assert torch.isnan(M.energy_in_mask(torch.zeros(1, 8, 8), masks[:1])).all()


def test_energy_random_maps_at_area_fraction():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(2000, 16, 16, generator=g) < 0.2
    e = M.energy_in_mask(M.random_maps((2000, 16, 16), seed=4), masks).mean().item()
    assert abs(e - masks.float().mean().item()) < 0.01


# --------------------------------------------------------------------------- boxes


def test_boxes_and_iou():
    masks = _rect_masks(1, 10, 12, 2, 3, 4, 5)
    assert torch.equal(M.mask_box(masks), torch.tensor([[3.0, 2.0, 8.0, 6.0]]))
    a = torch.tensor([[0.0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 2, 2]])
    b = torch.tensor([[2.0, 2, 6, 6], [0, 0, 2, 2], [5, 5, 6, 6]])
    assert torch.allclose(M.box_iou(a, b), torch.tensor([4 / 28, 1.0, 0.0]))
    assert torch.isnan(M.mask_box(torch.zeros(1, 4, 4, dtype=torch.bool))).all()
    # (B, 1, H, W) masks, as pointing_game and energy_in_mask take them, are the same boxes
    assert torch.equal(M.mask_box(masks[:, None]), torch.tensor([[3.0, 2.0, 8.0, 6.0]]))
    with pytest.raises(SalienceError, match=r"\(B, H, W\) or \(B, 1, H, W\)"):
        M.mask_box(masks[:, None].expand(1, 3, 10, 12))


def test_weak_localization_takes_largest_component():
    masks = _rect_masks(1, 20, 20, 2, 2, 6, 6)
    maps = torch.zeros(1, 20, 20)
    maps[0, 2:8, 2:8] = 1.0  # the object
    maps[0, 15:17, 15:17] = 1.0  # a small stray blob
    assert M.weak_localization(maps, masks).item() == pytest.approx(1.0)
    with_stray = M.weak_localization(maps, masks, largest=False).item()
    assert with_stray == pytest.approx(36 / 225)
    assert M.weak_localization(torch.zeros(1, 20, 20), masks).item() == 0.0
    for bad in ("0.2", None, 0, 1.5, float("nan")):  # a string or None was a raw TypeError
        with pytest.raises(SalienceError, match="threshold"):
            M.weak_localization(maps, masks, threshold=bad)


def test_largest_component_matches_scipy():
    from scipy import ndimage  # the reference (a test dependency)
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(20, 24, 24, generator=g) < 0.45
    ours = _largest_component(fg)
    for i in range(fg.shape[0]):
        lab, n = ndimage.label(fg[i].numpy(), structure=np.ones((3, 3)))
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        assert ours[i].sum().item() == sizes.max()
        # The chosen pixels form exactly one of scipy's components.
        chosen = np.unique(lab[ours[i].numpy()])
        assert len(chosen) == 1 and chosen[0] > 0


# --------------------------------------------------------------------------- deletion / insertion


def _linear_case(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(1, 1, 8, 8, generator=g) * 0.3
    x = torch.rand(b, 1, 8, 8, generator=g)
    return LinearScore(w), x, (w * x)[:, 0]  # contributions (B, H, W)


def test_deletion_curve_closed_form():
    model, x, contrib = _linear_case(2)
    steps = 8
    curves = M.deletion_curves(model, x, contrib, target=0, steps=steps, substrate="zero")
    for i in range(2):
        order = torch.argsort(contrib[i].flatten(), descending=True)
        flat = contrib[i].flatten()
        for k in range(steps + 1):
            kept = flat.clone()
            kept[order[: round(k * 64 / steps)]] = 0.0  # zero substrate removes the contribution
            assert curves[i, k].item() == pytest.approx(torch.sigmoid(kept.sum()).item(), abs=1e-6)
    assert torch.allclose(M.deletion(model, x, contrib, target=0, steps=steps, substrate="zero"), M.auc(curves))
    assert M.auc(torch.tensor([[0.0, 1.0], [1.0, 1.0]])).tolist() == [0.5, 1.0]


def test_oracle_map_deletes_fastest_and_inserts_fastest():
    model, x, contrib = _linear_case(16, seed=1)
    rnd = M.random_maps(contrib.shape, seed=5)
    d_oracle = M.deletion(model, x, contrib, target=0, steps=16, substrate="zero")
    d_rand = M.deletion(model, x, rnd, target=0, steps=16, substrate="zero")
    d_rev = M.deletion(model, x, -contrib, target=0, steps=16, substrate="zero")
    assert (d_oracle < d_rand).all() and (d_rand < d_rev).all()
    i_oracle = M.insertion(model, x, contrib, target=0, steps=16, substrate="zero")
    i_rand = M.insertion(model, x, rnd, target=0, steps=16, substrate="zero")
    i_rev = M.insertion(model, x, -contrib, target=0, steps=16, substrate="zero")
    assert (i_oracle > i_rand).all() and (i_rand > i_rev).all()


def test_deletion_is_batched_and_model_unchanged(small_cnn):
    calls = []
    small_cnn.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    x = torch.rand(5, 3, 8, 8)
    maps = torch.rand(5, 8, 8)
    small_cnn.train()
    with unchanged(small_cnn):
        curves = M.deletion_curves(small_cnn, x, maps, steps=9, batch_size=16)
    assert curves.shape == (5, 10)
    # One call for the predicted classes, then ceil(5 * 10 / 16) = 4 batched calls.
    assert calls == [5, 16, 16, 16, 2]
    # Start point is the probability of the predicted class on the untouched image.
    with torch.no_grad():
        small_cnn.eval()
        p = small_cnn(x).softmax(1).amax(1)
        small_cnn.train()
    assert torch.allclose(curves[:, 0], p, atol=1e-6)


def test_substrates_and_endpoints():
    model, x, contrib = _linear_case(3)
    # Deleting everything leaves the substrate: mean substrate -> sigmoid(sum(w) * mean(x)).
    curves = M.deletion_curves(model, x, contrib, target=0, steps=4, substrate="mean")
    expected = torch.sigmoid(model.w.sum() * x.mean((1, 2, 3)))
    assert torch.allclose(curves[:, -1], expected.detach(), atol=1e-6)
    curves = M.insertion_curves(model, x, contrib, target=0, steps=4, substrate=0.5)
    assert torch.allclose(curves[:, 0], torch.sigmoid(model.w.sum() * 0.5).detach().expand(3), atol=1e-6)
    assert torch.allclose(curves[:, -1], torch.sigmoid((contrib).sum((1, 2))), atol=1e-6)
    blurred = M.insertion_curves(model, x, contrib, target=0, steps=4)  # default substrate: blur
    assert not torch.allclose(blurred[:, 0], curves[:, 0])
    with pytest.raises(SalienceError, match="substrate"):
        M.deletion(model, x, contrib, substrate="noise")
    with pytest.raises(SalienceError, match="one map per image"):
        M.deletion(model, x, contrib[:2])
    with pytest.raises(SalienceError, match="steps"):
        M.deletion(model, x, contrib, steps=0)


def test_flat_map_ties_are_broken_at_random_not_row_by_row():
    # Score = sum of the top row only. Deleting a flat map row by row would kill it at once.
    w = torch.zeros(1, 1, 8, 8)
    w[..., 0, :] = 1.0
    model = LinearScore(w)
    x = torch.ones(1, 1, 8, 8)
    c = M.deletion_curves(model, x, torch.ones(1, 8, 8), target=0, steps=8, substrate="zero")
    assert c[0, 1].item() > torch.sigmoid(torch.tensor(4.0)).item()  # about 7 of 8 top pixels left
    c2 = M.deletion_curves(model, x, torch.ones(1, 8, 8), target=0, steps=8, substrate="zero")
    assert torch.equal(c, c2)  # seeded


# --------------------------------------------------------------------------- similarities


def test_spearman_matches_scipy_with_ties():
    from scipy import stats  # the reference
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 6, 6), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (4, 6, 6), generator=g).float()
    ours = M.spearman(a, b)
    for i in range(4):
        ref = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(M.spearman(a, a), torch.ones(4))
    # The batched tie-averaged ranks are scipy's rankdata, row by row (a constant row included).
    rows = torch.cat([a.flatten(1), torch.full((1, 36), 2.0)])
    assert torch.equal(_average_ranks(rows), torch.from_numpy(stats.rankdata(rows.numpy(), axis=1)).double())
    assert torch.allclose(M.spearman(a, -a), -torch.ones(4))


def test_ssim_matches_gaussian_filter_reference():
    from scipy import ndimage  # the reference (a test dependency)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 20, 20, generator=g)
    b = (a + 0.3 * torch.rand(2, 20, 20, generator=g))
    ours = M.ssim(a, b)
    for i in range(2):
        x = a[i].double().numpy()
        y = b[i].double().numpy()
        x = (x - x.min()) / (x.max() - x.min())
        y = (y - y.min()) / (y.max() - y.min())

        def filt(t):
            return ndimage.gaussian_filter(t, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]

        mx, my = filt(x), filt(y)
        sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        ref = (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean()
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(M.ssim(a, a), torch.ones(2))
    assert torch.allclose(M.ssim(a, 5 * a + 2), torch.ones(2))  # min-max scaled first


def test_hog_similarity():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 32, 32, generator=g)
    assert torch.allclose(M.hog_similarity(a, 3 * a), torch.ones(3), atol=1e-6)
    # Vertical stripes vs the same stripes turned by 90 degrees: different orientations.
    stripes = torch.sin(torch.arange(32.0) / 2).expand(32, 32)[None]
    assert M.hog_similarity(stripes, stripes.transpose(1, 2)).item() < 0.0
    unrelated = M.hog_similarity(a, torch.rand(3, 32, 32, generator=g))
    assert unrelated.abs().max() < 0.3


# --------------------------------------------------------------------------- randomization


def test_randomization_leaves_model_and_rng_untouched(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    small_cnn.train()
    state = torch.get_rng_state()
    with unchanged(small_cnn):
        r = M.randomization(small_cnn, x, vanilla, mode="cascading")
    assert torch.equal(torch.get_rng_state(), state)
    # Layers top first; BatchNorm joins its convolution.
    assert r.layers == ["head", "features.3", "features.0"]
    assert set(r.values) == set(M.SIMILARITIES)
    assert all(len(v) == 3 for v in r.values.values())
    assert r.per_image["ssim"].shape == (3, 2)
    assert M.randomization_layers(small_cnn, x) == ["features.0", "features.3", "head"]


def test_randomization_same_seed_same_numbers(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    a = M.randomization(small_cnn, x, "vanilla", mode="independent", seed=3)
    b = M.randomization(small_cnn, x, "vanilla", mode="independent", seed=3)
    c = M.randomization(small_cnn, x, "vanilla", mode="independent", seed=4)
    assert a.values == b.values
    assert a.values != c.values


def test_randomization_of_a_linear_model_destroys_the_map():
    # The vanilla map of a linear classifier is its weight row: re-initializing it gives an
    # independent map, so the rank correlation falls to about 0 (from 1 with itself).
    torch.manual_seed(0)  # seed 0 also for randomization: re-init must not recreate the model
    model = PixelLinear()
    x = torch.rand(4, 3, 8, 8)
    r = M.randomization(model, x, vanilla, target=1, seed=0)
    assert r.layers == ["fc"]
    assert abs(r["spearman_abs"][0]) < 0.2 and abs(r["spearman"][0]) < 0.2
    # Re-initializing with reset_parameters, as a fresh nn.Linear would be drawn under that seed.
    fresh = PixelLinear()
    with torch.random.fork_rng():
        torch.manual_seed(_step_seed(0, 0, 0))
        fresh.fc.reset_parameters()
    expected = M.spearman(vanilla(model, x, 1, reduce=None).sum(1), vanilla(fresh, x, 1, reduce=None).sum(1))
    assert r.per_image["spearman"][0] == pytest.approx(expected, abs=1e-6)


def test_randomization_layers_option_and_errors(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    r = M.randomization(small_cnn, x, vanilla, layers=["features", "head"], mode="independent")
    assert r.layers == ["head", "features"]
    with pytest.raises(SalienceError, match="no layer named"):
        M.randomization(small_cnn, x, vanilla, layers=["nope"])
    with pytest.raises(SalienceError, match="mode"):
        M.randomization(small_cnn, x, vanilla, mode="top")
    with pytest.raises(SalienceError, match="unknown method"):
        M.randomization(small_cnn, x, "nope")


def test_demo_model_vanilla_changes_more_than_guided_backprop():
    """Adebayo et al.'s finding on our demo model: after randomizing the top layer, guided
    backprop's map stays close to the original while vanilla gradients' map changes more; with
    all layers randomized, Guided Grad-CAM's map keeps its structure (SSIM)."""
    from salience.demo import data, zoo

    model = zoo.load_demo("shapes")
    x, _, _ = data.shapes(6, 10_000)
    van = M.randomization(model, x, "vanilla")
    gbp = M.randomization(model, x, "guided_backprop")
    assert gbp["ssim"][0] > van["ssim"][0] + 0.1
    assert gbp["spearman"][0] > van["spearman"][0] + 0.3
    assert van["spearman_abs"][-1] < van["spearman_abs"][0]  # cascading: falls as layers go
    # Guided Grad-CAM keeps its structure (SSIM) with every layer re-initialized; vanilla does not.
    ggc = M.randomization(model, x, "guided_gradcam")
    assert ggc["ssim"][-1] > 0.4 and van["ssim"][-1] < 0.15


def test_data_randomization():
    x = torch.rand(3, 3, 8, 8)
    images, labels = torch.rand(10, 3, 8, 8), torch.arange(10) % 4
    seen = []

    def ignores_labels(imgs, y):
        seen.append(y.clone())
        torch.manual_seed(0)
        return PixelLinear()

    out = M.data_randomization(ignores_labels, images, labels, x, vanilla)
    assert torch.equal(seen[0], labels) and sorted(seen[1].tolist()) == sorted(labels.tolist())
    assert not torch.equal(seen[1], labels)
    assert out["values"]["spearman"] == pytest.approx(1.0)  # same model both times

    def fits_labels(imgs, y):
        torch.manual_seed(0)
        m = PixelLinear()
        with torch.no_grad():  # class templates: the mean image of each class
            for k in range(4):
                m.fc.weight[k] = imgs[y == k].mean(0).flatten() - imgs.mean(0).flatten()
        return m

    out = M.data_randomization(fits_labels, images, labels, x, vanilla, target=0)
    assert out["values"]["spearman"] < 0.9
    assert set(out["train_accuracy"]) == {"true", "shuffled"}


# --------------------------------------------------------------------------- baselines


def _sr_reference(img: np.ndarray) -> np.ndarray:
    """Spectral residual with numpy / scipy, for a 64x64 gray image."""
    from scipy import ndimage

    f = np.fft.fft2(img)
    log_amp = np.log(np.abs(f))
    residual = log_amp - ndimage.uniform_filter(log_amp, 3, mode="mirror")
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(f)))) ** 2
    ax = np.arange(-2, 3)
    k = np.exp(-0.5 * (ax / 8.0) ** 2)
    k /= k.sum()
    sal = ndimage.convolve(sal, np.outer(k, k), mode="mirror")
    return (sal - sal.min()) / (sal.max() - sal.min())


def test_spectral_residual_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 64, 64, generator=g)
    ours = M.spectral_residual(img)
    assert ours.shape == (2, 64, 64)
    for i in range(2):
        ref = _sr_reference(img[i].double().mean(0).numpy())
        assert np.allclose(ours[i].numpy(), ref, atol=1e-5)


def test_spectral_residual_finds_the_odd_patch():
    # A periodic texture with one odd square: the square is the salient thing.
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    img = (0.5 + 0.2 * torch.sin(xx * 2 * math.pi / 8)).expand(1, 3, 96, 96).clone()
    img[:, :, 60:70, 20:30] = 1.0
    mask = torch.zeros(1, 96, 96, dtype=torch.bool)
    mask[:, 58:72, 18:32] = True
    s = M.spectral_residual(img)
    assert s.shape == (1, 96, 96) and s.min() >= 0 and s.max() <= 1
    assert M.pointing_game(s, mask).item() == 1.0
    assert M.energy_in_mask(s, mask).item() > 3 * mask.float().mean().item()


def test_random_maps_seeded():
    assert torch.equal(M.random_maps((2, 4, 4), seed=1), M.random_maps((2, 4, 4), seed=1))
    assert not torch.equal(M.random_maps((2, 4, 4), seed=1), M.random_maps((2, 4, 4), seed=2))


def test_baseline_options_that_make_no_map_are_refused():
    # center_maps(sigma=0) was all zeros (a "map" with no maximum, silently), random_maps(seed=1.5) and
    # spectral_residual(size=1) raised raw RuntimeErrors.
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(SalienceError, match="sigma"):
        M.center_maps(x, sigma=0)
    with pytest.raises(SalienceError, match="seed"):
        M.random_maps((1, 4, 4), seed=1.5)
    for size in (1, 2, 4.0):
        with pytest.raises(SalienceError, match="size"):
            M.spectral_residual(x, size=size)
    assert M.spectral_residual(x, size=3).shape == (1, 8, 8)


def test_cue_model_saliency_sits_on_the_cue():
    """The Clever Hans model looks at the cue: per pixel, its saliency is far denser on the small
    cue mark than on the shape, while the clean model's, on the same images, is denser on the
    shape. (The model-free spectral-residual map also likes the sharp mark, so the evidence is
    the contrast between the two models, not the cue model's number alone.)"""
    from salience.demo import data, zoo

    cue_model, clean = zoo.load_demo("shapes-cue"), zoo.load_demo("shapes")
    b = data.shapes_batch(32, 10_000, cue="train")

    def density(model, masks):
        return (M.energy_in_mask(vanilla(model, b.images), masks).nanmean() / masks.float().mean()).item()

    assert density(cue_model, b.cue_masks) > 5 * density(cue_model, b.masks)
    assert density(clean, b.masks) > 2 * density(clean, b.cue_masks)
    assert density(cue_model, b.cue_masks) > 10 * density(clean, b.cue_masks)
    maps = vanilla(cue_model, b.images)
    assert M.pointing_game(maps, b.cue_masks, tolerance=2).nanmean().item() > 0.5
    assert M.pointing_game(vanilla(clean, b.images), b.cue_masks, tolerance=2).nanmean().item() < 0.1


@pytest.mark.parametrize("batch_size", [3, 64])
def test_perturbation_metrics_take_per_image_targets_image_by_image(small_cnn, batch_size):
    """A per-image target (a class, or a multilabel class set, per image) scores each perturbed copy
    with its own image's part. Per-image multilabel sets were applied to the rows of each model call:
    a SalienceError when a call held more rows than images, and with batch_size = B each copy was
    silently scored with another image's set. Deletion and insertion (deterministic) equal one call
    per image; ROAD's raw curves (its noise does not depend on the target) of a class pair are the
    sum of the two classes' curves; a target for another number of images is refused by all four."""
    from salience import targets
    torch.manual_seed(0)
    x, maps = torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8)
    sets = torch.tensor([[0, 1], [2, 3], [1, 3]])
    for metric in (M.deletion_curves, M.insertion_curves):
        for given, one in [(torch.tensor([2, 0, 3]), lambda i: int([2, 0, 3][i])),
                           (targets.multilabel(sets), lambda i: targets.multilabel(sets[i].tolist()))]:
            with unchanged(small_cnn):
                both = metric(small_cnn, x, maps, given, batch_size=batch_size, steps=4)
            alone = torch.cat([metric(small_cnn, x[i:i + 1], maps[i:i + 1], one(i), batch_size=batch_size, steps=4)
                               for i in range(3)])
            torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-4)
    road = dict(batch_size=batch_size, probability=False, fractions=(0.25, 0.5))
    pair = M.road_curves(small_cnn, x, maps, targets.multilabel(sets), **road)
    torch.testing.assert_close(pair, M.road_curves(small_cnn, x, maps, sets[:, 0], **road)
                               + M.road_curves(small_cnn, x, maps, sets[:, 1], **road), atol=1e-5, rtol=1e-4)
    assert M.faithfulness_correlation(small_cnn, x, maps, targets.multilabel(sets), subsets=4,
                                      batch_size=batch_size).shape == (3,)
    for metric, opts in [(M.deletion_curves, dict(steps=4)), (M.insertion_curves, dict(steps=4)),
                         (M.road_curves, dict(fractions=(0.5,))), (M.faithfulness_correlation, dict(subsets=4))]:
        for wrong in (torch.tensor([0, 1, 2, 3]), targets.multilabel(sets[:2])):
            with pytest.raises(SalienceError, match="for a batch of 3|the batch has 3"):
                metric(small_cnn, x, maps, wrong, batch_size=batch_size, **opts)


def test_deletion_and_road_of_a_one_logit_model_score_its_sigmoid():
    """A binary classifier with one logit: the softmax of one number is 1, so every deletion,
    insertion and ROAD curve was 1 (AUCs equal for every map). Its probability, the sigmoid of the
    logit, is scored: the deletion curve is the closed form ``sigmoid(sum(w * x))`` over the pixels
    kept."""
    model, x, contrib = _linear_case(2)
    one = nn.Sequential(model, _FirstColumn())
    steps = 8
    curves = M.deletion_curves(one, x, contrib, target=0, steps=steps, substrate="zero")
    for i in range(2):
        order = torch.argsort(contrib[i].flatten(), descending=True)
        for k in range(steps + 1):
            kept = contrib[i].flatten().clone()
            kept[order[: round(k * 64 / steps)]] = 0.0
            assert curves[i, k].item() == pytest.approx(torch.sigmoid(kept.sum()).item(), abs=1e-5)
    assert (M.deletion(one, x, contrib, target=0, steps=8, substrate="zero")
            < M.deletion(one, x, -contrib, target=0, steps=8, substrate="zero")).all()
    road = M.road_curves(one, x, contrib, fractions=(0.2, 0.5))
    assert not torch.equal(road, torch.ones_like(road))


class _FirstColumn(nn.Module):
    def forward(self, out):
        return out[:, :1]  # (B, 1): one logit


def test_half_precision_maps_are_scored_like_float32():
    # A half-precision model's maps are float16. Energy sums |map| over the image: 4096 values of
    # about 50 overflow float16 (max 65504), and inside / inf was a silent 0 (or NaN). The maps'
    # float16 values are exact in float32, so the share is the float32 one: 1/4 here (top half 1,
    # bottom half 3 before scaling).
    masks = _rect_masks(2, 64, 64, 0, 0, 32, 64)
    maps = torch.where(masks, 40.0, 120.0).half()
    assert torch.allclose(M.energy_in_mask(maps, masks), torch.full((2,), 0.25))
    assert M.energy_in_mask(maps, masks).dtype == torch.float32
    assert torch.allclose(M.energy_in_mask(maps.bfloat16(), masks), torch.full((2,), 0.25))
    # Gini of two magnitudes a < b on halves: (b - a) / (2 (a + b)) = 80 / 320.
    assert torch.allclose(M.sparseness(maps), torch.full((2,), 0.25))


def test_a_blur_that_leaves_the_image_as_it_is_is_refused():
    # blur_sigma <= 0 made the blurred substrate x itself: "removed" pixels kept their values, the
    # curve stayed at the clean probability and every map scored the same (1.0 here).
    model, x, contrib = _linear_case(2)
    for sigma in (0, -1.0, float("nan"), "5"):
        for fn in (M.deletion, M.insertion, M.faithfulness_correlation):
            with pytest.raises(SalienceError, match="blur_sigma"):
                fn(model, x, contrib, 0, blur_sigma=sigma)
    # Another substrate does not read blur_sigma; a small positive blur is a blur.
    M.deletion(model, x, contrib, 0, substrate="zero", blur_sigma=0)
    assert (M.deletion_curves(model, x, contrib, 0, steps=2, blur_sigma=0.5)[:, -1]
            != M.deletion_curves(model, x, contrib, 0, steps=2, blur_sigma=0.5)[:, 0]).all()


class _OneLogit(nn.Module):
    """A binary classifier with one logit ``sum(w * x)``, as ``(B, 1)`` or ``(B,)``."""

    def __init__(self, w: torch.Tensor, flat: bool = False):
        super().__init__()
        self.w, self.flat = nn.Parameter(w.clone()), flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return s if self.flat else s[:, None]


@pytest.mark.parametrize("flat", [False, True])
def test_a_single_logit_scores_its_sigmoid(flat):
    # The softmax over one class is 1 whatever the input: every map scored deletion = insertion =
    # ROAD = 1 on a (B, 1) binary classifier. Its probability is the sigmoid of the logit: deleting
    # to zero in the order of the contributions w * x leaves sigmoid(sum of the rest) at each step.
    _, x, contrib = _linear_case(2)
    w = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    model = _OneLogit(w, flat)
    contrib = (w * x)[:, 0]
    curves = M.deletion_curves(model, x, contrib, steps=64, substrate="zero")
    c = contrib.flatten(1)
    left = c.sum(1, keepdim=True) - torch.cat([torch.zeros(2, 1), c.sort(1, descending=True).values.cumsum(1)], 1)
    torch.testing.assert_close(curves, torch.sigmoid(left), atol=1e-5, rtol=0)
    assert bool((M.deletion(model, x, contrib, substrate="zero")
                 < M.deletion(model, x, M.random_maps((2, 8, 8), seed=0), substrate="zero")).all())
    raw = M.deletion_curves(model, x, contrib, steps=64, substrate="zero", probability=False)
    torch.testing.assert_close(raw, left, atol=1e-5, rtol=0)


def test_a_layer_target_is_scored_on_its_layer():
    # activation(layer, channel) and custom(..., layer=) name an inner layer's output; the
    # perturbation metrics scored them on the model's output instead (silently: the curve started
    # at the output's channel, not the layer's mean). Layer "0" copies x (a 1x1 conv of weight 1),
    # so the activation target is the mean of x: deleting to zero in the order of x leaves the
    # mean of the pixels not yet removed.
    from salience import targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(36, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.rand(2, 1, 6, 6)
    maps = x[:, 0]
    curves = M.deletion_curves(model, x, maps, targets.activation("0", 0), steps=36, substrate="zero")
    v = x.flatten(1).sort(1, descending=True).values
    left = torch.cat([x.flatten(1).sum(1, keepdim=True), x.flatten(1).sum(1, keepdim=True) - v.cumsum(1)], 1) / 36
    torch.testing.assert_close(curves, left, atol=1e-6, rtol=0)
    custom = M.deletion_curves(model, x, maps, targets.custom(lambda o: o.flatten(1).amax(1), layer="0"),
                               steps=36, substrate="zero")
    torch.testing.assert_close(custom[:, 0], x.flatten(1).amax(1))  # the layer's largest value: x's
    torch.testing.assert_close(custom[:, 1], v[:, 1])  # the largest gone, the second is the max
    road = M.road_curves(model, x, maps, targets.activation("0", 0), fractions=(0.5,), noise=0.0)
    assert bool((road[:, 0] < x.mean((1, 2, 3))).all())  # the brightest half replaced from darker neighbours


def test_a_numpy_array_of_classes_is_a_per_image_target():
    # np.array([1, 0]) raised a raw TypeError (numpy arrays have __index__, so int(array) was tried);
    # it is one class per image, as the list is: the same curves.
    model, x, contrib = _linear_case(2)
    for t in (np.array([1, 0]), np.array([1, 0], dtype=np.int32)):
        torch.testing.assert_close(M.deletion_curves(model, x, contrib, t, steps=4),
                                   M.deletion_curves(model, x, contrib, [1, 0], steps=4))
    torch.testing.assert_close(M.deletion(model, x, contrib, np.int64(1), steps=4),
                               M.deletion(model, x, contrib, 1, steps=4))
    with pytest.raises(SalienceError, match="integer class indices"):
        M.deletion(model, x, contrib, np.array([1.0, 0.0]))
