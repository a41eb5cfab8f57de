"""The metrics' random draws belong to images, not to positions; multilabel models scored by sigmoid.

1. Every draw a metric makes for one image (ROAD's imputation noise, faithfulness correlation's
   pixel sets, max-sensitivity's noisy copies, random logit's other class, SmoothGrad's noise inside
   the method tests, the random baseline of ``salience evaluate``) comes from a generator seeded by
   the metric's ``seed`` and the image's content: an image scores the same alone as in a batch, and
   reordering the batch permutes the scores. (Before, one generator's stream ran over the batch, so
   image ``i``'s draws were those of position ``i``.)
2. ``probability="sigmoid"`` scores each class by its own sigmoid (a multilabel model): on a linear
   multilabel model the deletion / insertion curves are the sigmoids of the hand-computed logits.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from salience import SalienceError
from salience import evidence as M
from salience.evidence import evaluate as E

from conftest import unchanged

PERM = [2, 0, 3, 1]


class TinyNet(nn.Module):
    """A small conv net with 6 classes: outputs that mix the pixels, so any change of the draws shows."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _case():
    g = torch.Generator().manual_seed(1)
    model = TinyNet()
    x = torch.rand(4, 2, 8, 8, generator=g, dtype=torch.float64).float()
    maps = torch.rand(4, 8, 8, generator=g)
    return model, x, maps


def _check(per_image, x, maps=None, atol=1e-5):
    """``per_image(x, maps) -> (B,) or (B, ...)``: image i alone gives row i; a reordered batch the
    reordered rows."""
    full = per_image(x, maps)
    for i in range(x.shape[0]):
        alone = per_image(x[i:i + 1], None if maps is None else maps[i:i + 1])
        torch.testing.assert_close(alone[0], full[i], atol=atol, rtol=0, equal_nan=True)
    moved = per_image(x[PERM], None if maps is None else maps[PERM])
    torch.testing.assert_close(moved, full[PERM], atol=atol, rtol=0, equal_nan=True)


def test_road_noise_is_the_images_own():
    pytest.importorskip("scipy")
    model, x, maps = _case()
    kw = dict(target=1, fractions=(0.3, 0.6), noise=0.2, probability=False)
    _check(lambda xx, mm: M.road_curves(model, xx, mm, **kw), x, maps)
    # the noise is really there (else the test would prove nothing)
    assert not torch.allclose(M.road_curves(model, x, maps, **kw), M.road_curves(model, x, maps, **{**kw, "noise": 0.0}))
    removed = maps > 0.5
    _check(lambda xx, mm: M.linear_imputation(xx, mm > 0.5, noise=0.3, seed=4), x, maps, atol=0)
    assert not torch.equal(M.linear_imputation(x, removed, noise=0.3, seed=4), M.linear_imputation(x, removed))


def test_faithfulness_correlation_sets_are_the_images_own():
    model, x, maps = _case()
    _check(lambda xx, mm: M.faithfulness_correlation(model, xx, mm, 1, subsets=6, subset_size=0.2, seed=3), x, maps)


def test_max_sensitivity_noise_is_the_images_own():
    model, x, _ = _case()
    _check(lambda xx, _m: M.max_sensitivity(model, xx, "vanilla", 2, samples=2, radius=0.1, seed=5), x)


def test_smoothgrad_noise_in_the_method_tests_is_the_images_own():
    model, x, _ = _case()
    kw = dict(samples=3, noise=0.3)
    _check(lambda xx, _m: M.max_sensitivity(model, xx, "smoothgrad", 2, samples=2, radius=0.05, method_kwargs=kw),
           x)
    _check(lambda xx, _m: M.random_logit(model, xx, "smoothgrad", kind="spearman", method_kwargs=kw), x)

    def top_layer(xx, _m):
        r = M.randomization(model, xx, "smoothgrad", 2, layers=["head"], method_kwargs=kw)
        return r.per_image["spearman"][0]
    _check(top_layer, x)


def test_random_logit_class_is_the_images_own():
    model, x, _ = _case()
    x = x.repeat(3, 1, 1, 1)[:8] + torch.linspace(0, 0.01, 8)[:, None, None, None]  # 8 distinct images
    perm = [5, 2, 7, 0, 3, 1, 6, 4]
    full = M.random_logit(model, x, "vanilla", 0, kind="spearman", seed=1)
    for i in range(8):
        torch.testing.assert_close(M.random_logit(model, x[i:i + 1], "vanilla", 0, kind="spearman", seed=1)[0],
                                   full[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(M.random_logit(model, x[perm], "vanilla", 0, kind="spearman", seed=1), full[perm],
                               atol=1e-5, rtol=0)


def test_deletion_and_insertion_share_one_tie_order_and_are_position_free():
    """Their one draw, the order that breaks ties, is one permutation of the pixel positions shared
    by every image on purpose: flat maps (all ties) score the same alone and in a batch."""
    model, x, _ = _case()
    flat = torch.zeros(4, 8, 8)
    for fn in (M.deletion, M.insertion):
        _check(lambda xx, mm: fn(model, xx, mm, 1, steps=8, seed=2), x, flat)


def test_the_random_baseline_of_evaluate_is_the_images_own():
    model, x, _ = _case()
    _, maps = E.evaluate_methods(model, x, methods=[], steps=2)
    _, alone = E.evaluate_methods(model, x[2:3], methods=[], steps=2)
    assert torch.equal(alone["random"][0], maps["random"][2])
    seeds = M.image_seeds(x, 0)
    assert seeds == [M.image_seeds(x[i:i + 1], 0)[0] for i in range(4)]
    assert M.image_seeds(x[PERM], 0) == [seeds[i] for i in PERM]
    assert len(set(seeds)) == 4 and M.image_seeds(x.double(), 0) == seeds  # content, not dtype
    assert torch.equal(M.random_maps((4, 8, 8), seed=seeds)[PERM], M.random_maps((4, 8, 8), seed=[seeds[i] for i in PERM]))
    with pytest.raises(SalienceError, match="one seed per map"):
        M.random_maps((4, 8, 8), seed=seeds[:3])


# ----------------------------------------------------------------------------- multilabel: sigmoid


class MultiLabelLinear(nn.Module):
    """Three independent classes, logit_c = b_c + sum_p W_c,p x_p (one channel)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def _multilabel_case():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 16, generator=g, dtype=torch.float64)
    b = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    maps = torch.rand(2, 4, 4, generator=g, dtype=torch.float64)  # no ties
    return MultiLabelLinear(w, b).double(), w, b, x, maps


def test_deletion_and_insertion_score_each_class_by_its_sigmoid():
    model, w, b, x, maps = _multilabel_case()
    target = 2
    with unchanged(model):
        dc = M.deletion_curves(model, x, maps, target, steps=16, substrate="zero", probability="sigmoid")
        ic = M.insertion_curves(model, x, maps, target, steps=16, substrate="zero", probability="sigmoid")
    for i in range(2):
        order = maps[i].flatten().argsort(descending=True)
        contrib = w[target] * x[i].flatten()
        for k in range(17):  # step k: the k most salient pixels zeroed (deletion) / the only ones kept (insertion)
            gone = contrib[order[:k]].sum()
            expected_del = torch.sigmoid(b[target] + contrib.sum() - gone)
            expected_ins = torch.sigmoid(b[target] + gone)
            torch.testing.assert_close(dc[i, k].double(), expected_del, atol=1e-6, rtol=0)
            torch.testing.assert_close(ic[i, k].double(), expected_ins, atol=1e-6, rtol=0)
    # the default is still the softmax over the classes (which a multilabel model's scores are not)
    soft = M.deletion_curves(model, x, maps, target, steps=16, substrate="zero")
    expected0 = torch.softmax(b + (w * x[0].flatten()).sum(1), 0)[target]
    torch.testing.assert_close(soft[0, 0].double(), expected0, atol=1e-6, rtol=0)
    assert M.deletion(model, x, maps, target, steps=16, substrate="zero", probability="softmax").equal(
        M.auc(soft))


def test_road_and_faithfulness_correlation_take_the_sigmoid_too():
    pytest.importorskip("scipy")
    model, w, b, x, maps = _multilabel_case()
    kw = dict(fractions=(0.25, 0.5), noise=0.0)
    raw = M.road_curves(model, x, maps, 1, probability=False, **kw)
    torch.testing.assert_close(M.road_curves(model, x, maps, 1, probability="sigmoid", **kw), raw.sigmoid(),
                               atol=1e-6, rtol=0)
    corr = M.faithfulness_correlation(model, x, maps, 1, subsets=8, substrate="zero", probability="sigmoid")
    assert torch.isfinite(corr).all()


@pytest.mark.parametrize("bad", ["Sigmoid", "logit", "none", 1, None, 0.5])
def test_a_bad_probability_is_an_error_naming_the_choices(bad):
    model, _, _, x, maps = _multilabel_case()
    calls = [lambda: M.deletion(model, x, maps, 0, steps=2, probability=bad),
             lambda: M.faithfulness_correlation(model, x, maps, 0, subsets=2, probability=bad),
             lambda: E.evaluate_methods(model.float(), x.float(), methods=[], steps=2, probability=bad),
             lambda: E.run_evaluation(model.float(), "unused-folder", n=2, probability=bad)]
    for call in calls:
        with pytest.raises(SalienceError, match="'softmax'.*'sigmoid'.*False"):
            call()


def test_evaluate_scores_a_multilabel_model_by_sigmoid():
    model, w, b, x, _ = _multilabel_case()
    model, x = model.float(), x.float()
    rows, maps = E.evaluate_methods(model, x, methods=[], steps=4, probability="sigmoid")
    target = model(x).argmax(1)
    row = {r.name: r for r in rows}["center"]
    expected = M.deletion(model, x, maps["center"], target, steps=4, batch_size=64, probability="sigmoid")
    assert row.deletion == pytest.approx(float(expected.mean()), abs=1e-6)
    softmax = M.deletion(model, x, maps["center"], target, steps=4, batch_size=64)
    assert abs(float(expected.mean()) - float(softmax.mean())) > 1e-3  # the option made a difference
