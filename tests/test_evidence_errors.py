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
