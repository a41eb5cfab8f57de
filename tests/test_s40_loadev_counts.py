"""The evidence metrics' counts of passes of the model (deletion / insertion ``steps``, faithfulness correlation's
``subsets``, max-sensitivity's ``samples``, ROAD's fractions, the evaluation's ``steps``) are ints from their least
to :data:`salience._core.engine.MAX_PASSES`, refused with a ``SalienceError`` naming the cap and why before anything
is built or any pass runs. Before: ``steps=10**12`` was cut to H x W and ran, ``subsets=10**12`` asked torch for
256 TB, ``samples=10**12`` ran the model first, two million ROAD fractions ran two million passes of each image, and
a string fraction ``"0.5"`` was taken. The model fails if a pass runs; a timer fails a hang."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from salience import SalienceError
from salience._core.engine import MAX_PASSES
from salience.evidence import (deletion, deletion_curves, faithfulness_correlation, insertion, insertion_curves,
                               max_sensitivity, road, road_curves)
from test_s40_leftlib_pass_caps import _within  # a SIGALRM timer: a hang fails the test


class _NoPass(nn.Module):
    """A model that must not run: the refusal comes first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        raise AssertionError("a pass ran before the count was refused")


X, MAPS = torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8)
XB, MAPSB = torch.rand(1, 3, 1001, 1000), torch.rand(1, 1001, 1000)  # steps run min(steps, H x W) passes
M = _NoPass()
CALLS = {
    "deletion_curves.steps": (lambda n: deletion_curves(M, XB, MAPSB, 0, steps=n), 1),
    "insertion_curves.steps": (lambda n: insertion_curves(M, XB, MAPSB, 0, steps=n), 1),
    "deletion.steps": (lambda n: deletion(M, XB, MAPSB, 0, steps=n), 1),
    "insertion.steps": (lambda n: insertion(M, XB, MAPSB, 0, steps=n), 1),
    "faithfulness_correlation.subsets": (lambda n: faithfulness_correlation(M, X, MAPS, 0, subsets=n), 2),
    "max_sensitivity.samples": (lambda n: max_sensitivity(M, X, "gradient", 0, samples=n), 1),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("n", [10 ** 12, MAX_PASSES + 1])
def test_a_count_past_the_cap_is_refused_before_any_pass(name, n):
    call, _ = CALLS[name]
    with _within(10), pytest.raises(SalienceError, match=rf"{name.split('.')[1]}={n:,}( \(.*\))? is more than the "
                                                          rf"{MAX_PASSES:,} passes of each image.*give at most"):
        call(n)


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("bad", ["least - 1", -1, 2.5, 4.0, True, "8", None, float("nan")])
def test_no_count_below_the_least_nor_a_non_integer(name, bad):
    call, least = CALLS[name]
    bad = least - 1 if bad == "least - 1" else bad
    with _within(10), pytest.raises(SalienceError, match=rf"{name.split('.')[1]} must be an int >= {least}"):
        call(bad)


@pytest.mark.parametrize("fractions", [[0.5] * (MAX_PASSES + 1), itertools.repeat(0.5)], ids=["list", "endless"])
@pytest.mark.parametrize("fn", [road, road_curves])
def test_road_fractions_past_the_cap(fn, fractions):
    with _within(10), pytest.raises(SalienceError, match=rf"{MAX_PASSES + 1:,} ROAD fractions or more are more than "
                                                         rf"the {MAX_PASSES:,} passes.*give at most"):
        fn(M, X, MAPS, 0, fractions=fractions)


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5]])
def test_a_road_fraction_is_a_number(bad):
    with _within(10), pytest.raises(SalienceError, match=r"each ROAD fraction must be a .*number"):
        road(M, X, MAPS, 0, fractions=(0.25, bad))


def test_the_evaluations_steps(tmp_path):
    from salience.evidence.evaluate import run_evaluation

    for bad, said in ((0, "steps must be"), (True, "steps must be")):
        with _within(10), pytest.raises(SalienceError, match=said):
            run_evaluation(M, tmp_path / "out", steps=bad)
    assert not (tmp_path / "out").exists()


def test_counts_within_the_cap_still_run():
    class Sum(nn.Module):
        def forward(self, x):
            return x.sum((1, 2, 3))[:, None]

    assert deletion_curves(Sum(), X, MAPS, 0, steps=MAX_PASSES, substrate="zero", probability=False).shape == (1, 65)
    assert road_curves(Sum(), X, MAPS, 0, fractions=(0.5,) * 3, probability=False).shape == (1, 3)


def test_road_fractions_as_a_tensor_or_a_generator():
    """``torch.linspace(0.1, 0.9, 9)`` as fractions runs, as before session 40 (``float()`` of each element): the
    check of each fraction as a number refused its 0-d tensors. A bool tensor and a 0-d tensor stay refused, and a
    generator's bad fraction is named (the message listed what was left of it: ``[]``)."""
    class Sum(nn.Module):
        def forward(self, x):
            return x.sum((1, 2, 3))[:, None]

    want = road_curves(Sum(), X, MAPS, 0, fractions=[0.25, 0.5, 0.75], probability=False)
    got = road_curves(Sum(), X, MAPS, 0, fractions=torch.linspace(0.25, 0.75, 3), probability=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(SalienceError, match="each ROAD fraction must be a"):
        road_curves(Sum(), X, MAPS, 0, fractions=torch.tensor([True, False]))
    with pytest.raises(SalienceError, match="must be a sequence of fractions"):
        road_curves(Sum(), X, MAPS, 0, fractions=torch.tensor(0.5))
    with pytest.raises(SalienceError, match=r"strictly between 0 and 1, got \[0.5, 1.5\]"):
        road_curves(Sum(), X, MAPS, 0, fractions=(f for f in (0.5, 1.5)))


def test_steps_past_the_pixels_are_cut_to_one_a_pixel_not_refused(tmp_path):
    """More steps than pixels are cut to one a pixel (documented: the curve then has H x W + 1 points, the exact
    per-pixel curve), so the passes a call runs are min(steps, H x W): ``steps=10**12`` on an 8 x 8 image runs its
    64 and is not refused with "would take 32 years" (67c6dcb capped the steps given, not the passes run). Past
    the cap in passes it is still refused, in the evaluation before its folder is made."""
    from salience._core.info import ModelInfo
    from salience.evidence.evaluate import run_evaluation

    class Sum(nn.Module):
        def forward(self, x):
            return x.sum((1, 2, 3))[:, None]

    for n in (MAX_PASSES + 1, 10 ** 12):
        assert deletion_curves(Sum(), X, MAPS, 0, steps=n, substrate="zero", probability=False).shape == (1, 65)
    big = _NoPass()
    big.salience_info = ModelInfo(input_size=(1001, 1001))
    with _within(20), pytest.raises(SalienceError, match=r"steps=1,000,000,000,000 \(1,002,001 passes, one a pixel\)"
                                                         rf" is more than the {MAX_PASSES:,}"):
        run_evaluation(big, tmp_path / "out", n=1, steps=10 ** 12)
    assert not (tmp_path / "out").exists()
