"""Issue 16, "Evidence you can trust": the loose ends of the metrics' errors. The ``probability=``
choices are public; a bad map or score is an error naming the caller's image and which copy of it
(not a row of an internal flattened batch, not a NaN metric averaged away); huge finite maps are
scored, not overflowed."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from salience import SalienceError
from salience import evidence as M


def _linear(classes: int = 3, side: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, classes))


def test_probability_choices_are_public_each_is_accepted_and_others_are_refused_by_name():
    from salience.evidence import PROBABILITY

    assert "PROBABILITY" in M.__all__ and M.PROBABILITY is PROBABILITY
    model, x = _linear(), torch.rand(2, 3, 8, 8)
    maps, cls = torch.rand(2, 8, 8), torch.tensor([0, 2])
    logits = model(x).detach()[torch.arange(2), cls]
    expected = {"softmax": model(x).detach().softmax(1)[torch.arange(2), cls], "sigmoid": logits.sigmoid(),
                None: logits}
    for choice in PROBABILITY:
        link = "softmax" if choice is True else None if choice is False else choice
        # step 0 of the curve is the untouched image: its score is the chosen link of the class's logit
        curve = M.deletion_curves(model, x, maps, cls, steps=2, probability=choice)
        torch.testing.assert_close(curve[:, 0], expected[link])
        M.faithfulness_correlation(model, x, maps, cls, subsets=2, probability=choice)
        M.road(model, x, maps, cls, fractions=(0.5,), probability=choice)
    for bad in ("softmx", "Sigmoid", "raw", None, 1, 0, 0.5):
        with pytest.raises(SalienceError) as err:
            M.deletion(model, x, maps, cls, steps=2, probability=bad)
        for choice in PROBABILITY:
            assert repr(choice) in str(err.value), (bad, str(err.value))


def test_max_sensitivity_names_the_image_and_noisy_copy_of_a_nan_map_not_a_flattened_row():
    # It said "image 7": row k * B + i of its own batch of copies (here copy 2 of image 1).
    model = _linear()
    x = torch.rand(3, 3, 8, 8)
    seen = [0, 0, 0]  # noisy copies of each image the method has seen, in the order it saw them

    def broken(model, xb, target=None):
        m = xb.mean(1).clone()
        for r, row in enumerate(xb):
            dist = (x - row).flatten(1).abs().amax(1)
            i = int(dist.argmin())
            if float(dist[i]) == 0:
                continue  # the image itself
            if i == 1 and seen[1] == 2:
                m[r, 3, 3] = float("nan")
            seen[i] += 1
        return m

    with pytest.raises(SalienceError, match=r"NaN or infinite values \(image 1, noisy copy 2 of its 4 ") as err:
        M.max_sensitivity(model, x, broken, samples=4, radius=0.05, batch_size=4)
    assert "image 7" not in str(err.value)


def test_random_logit_says_which_class_map_has_nan():
    model = _linear()
    x = torch.rand(3, 3, 8, 8)
    pred = model(x).argmax(1)

    def broken(model, xb, target):
        m = xb.mean(1).clone()
        for r, row in enumerate(xb):  # image 1's map of the other class only
            if torch.equal(row, x[1]) and int(target[r]) != int(pred[1]):
                m[r] = float("inf")
        return m

    with pytest.raises(SalienceError, match=r"\(image 1, the map of the random other class \d\)"):
        M.random_logit(model, x, broken, batch_size=2)


def test_randomization_names_the_image_and_the_step_of_a_nan_map():
    # The similarities refused it as "a contain NaN or infinite values": which image, which model?
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.rand(3, 3, 8, 8)
    calls = [0]

    def broken_at(call):
        def fn(model, xb, target=None):
            m = xb.mean(1).clone()
            if calls[0] == call:
                m[1, 0, 0] = float("nan")
            calls[0] += 1
            return m
        return fn

    with pytest.raises(SalienceError, match=r"\(image 1, the original model's map\)"):
        M.randomization(model, x, broken_at(0))
    calls[0] = 0
    with pytest.raises(SalienceError, match=r"\(image 1, the map after re-initializing '0' and every layer above "
                                            r"it \(step 2 of 2, cascading, seed=0\)\)"):
        M.randomization(model, x, broken_at(2))
    calls[0] = 0
    with pytest.raises(SalienceError, match=r"\(image 1, the map of the model trained on the shuffled labels\)"):
        M.data_randomization(lambda i, y: model, x, torch.arange(3), x, broken_at(1))
    assert [p.requires_grad for p in model.parameters()] == [True] * 4


class _NanWhere(nn.Module):
    """A linear classifier whose output row is NaN where ``bad(row)`` holds."""

    def __init__(self, bad):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 8 * 8, 3)
        self.bad = bad

    def forward(self, x):
        out = self.lin(x.flatten(1))
        nan = torch.tensor([bool(self.bad(r)) for r in x])
        return torch.where(nan[:, None], torch.full_like(out, float("nan")), out)


def test_a_nan_score_of_a_perturbed_image_is_an_error_naming_the_image_and_step():
    # The model's NaN on a perturbed copy made the metric NaN without a word (and evaluate's
    # nanmean left the image out); now it names the image and the copy.
    x = torch.rand(3, 3, 8, 8)
    sub = torch.zeros_like(x)
    sub[1] = 7.0  # only image 1's substrate is 7: the model fails as soon as one of its pixels is removed
    model = _NanWhere(lambda r: bool((r == 7).any()))
    maps = torch.rand(3, 8, 8)
    with pytest.raises(SalienceError, match=r"on image 1 at step 1 of 4 of its deletion curve \(16 of its 64 "
                                            r"pixels removed\)"):
        M.deletion(model, x, maps, 0, steps=4, substrate=sub)
    with pytest.raises(SalienceError, match=r"on image 1 at step 0 of 4 of its insertion curve \(0 of its 64 "
                                            r"pixels put back"):
        M.insertion_curves(model, x, maps, 0, steps=4, substrate=sub)
    with pytest.raises(SalienceError, match=r"on image 1 with its random pixel set 0 of 4 \(6 pixels\) replaced"):
        M.faithfulness_correlation(model, x, maps, 0, subsets=4, substrate=sub)
    # ROAD: image 2's imputed copies fail (the clean image, which resolves the class, does not)
    road_model = _NanWhere(lambda r: not any(torch.equal(r, c) for c in x)
                           and int((x - r).flatten(1).abs().sum(1).argmin()) == 2)
    with pytest.raises(SalienceError, match=r"on image 2 with 19 of its 64 pixels removed \(lerf, fraction 0.3\)"):
        M.road_curves(road_model, x, maps, order="lerf", fractions=(0.3, 0.6))


def test_a_substrate_that_is_not_finite_is_refused():
    model, x, maps = _linear(), torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    for sub in (float("nan"), float("inf"), 1e39):  # 1e39: inf in float32
        with pytest.raises(SalienceError, match="substrate"):
            M.deletion(model, x, maps, 0, steps=2, substrate=sub)
    sub = torch.zeros(3, 1, 1)
    sub[2] = float("nan")
    with pytest.raises(SalienceError, match="substrate tensor has NaN or infinite"):
        M.insertion(model, x, maps, 0, steps=2, substrate=sub)
    with pytest.raises(SalienceError, match="substrate tensor has NaN or infinite"):
        M.faithfulness_correlation(model, x, maps, 0, subsets=2, substrate=sub)


def test_maps_with_nan_name_the_images():
    maps, masks = torch.rand(4, 6, 6), torch.ones(4, 6, 6, dtype=torch.bool)
    maps[1, 2, 2], maps[3, 0, 0] = float("nan"), -float("inf")
    with pytest.raises(SalienceError, match=r"maps contain NaN or infinite values \(images 1, 3 of 4\)"):
        M.pointing_game(maps, masks)
    with pytest.raises(SalienceError, match=r"\(image 1 of 2\)"):
        M.sparseness(maps[:2])
    many = torch.full((9, 2, 2), float("nan"))
    with pytest.raises(SalienceError, match=r"\(images 0, 1, 2, 3, 4 and 4 more of 9\)"):
        M.complexity(many)


@pytest.mark.parametrize("value,dtype", [(1e37, torch.float32), (1e307, torch.float64)])
def test_huge_finite_maps_are_scored_not_overflowed(value, dtype):
    # The sums overflowed: energy 0 (float32) or NaN (float64), sparseness NaN, complexity 0.
    n = 64
    flat = torch.full((2, 8, 8), value, dtype=dtype)
    one = torch.zeros(2, 8, 8, dtype=dtype)
    one[:, 3, 5] = value
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :2], masks[1, :, :6] = True, True
    torch.testing.assert_close(M.energy_in_mask(flat, masks), torch.tensor([16 / n, 48 / n], dtype=dtype))
    torch.testing.assert_close(M.energy_in_mask(-flat, masks, absolute=True),
                               torch.tensor([16 / n, 48 / n], dtype=dtype))
    torch.testing.assert_close(M.energy_in_mask(one, masks), torch.tensor([0.0, 1.0], dtype=dtype))
    torch.testing.assert_close(M.sparseness(flat), torch.zeros(2))
    torch.testing.assert_close(M.sparseness(one), torch.full((2,), 1 - 1 / n))
    torch.testing.assert_close(M.complexity(flat), torch.full((2,), math.log(n)))
    torch.testing.assert_close(M.complexity(one), torch.zeros(2))
