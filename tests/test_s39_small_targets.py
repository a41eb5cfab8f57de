"""``targets.multilabel`` with a class given twice. It summed the class's score twice (``multilabel([1, 1])`` was
``2 * output[:, 1]``, its map twice class 1's) without a word. Now refused, naming the class (and the row of a
``(B, k)`` set).

Why refused, not de-duplicated: multilabel is a *set* of labels, so a repeat is a slip (two lists joined, a
label read twice), and silently dropping it would also hide it; de-duplicating a ``(B, k)`` tensor would leave
rows of different lengths. The peers give no rule to follow: Captum's ``target`` and tf-keras-vis's
``CategoricalScore`` pick one class per image (a list there is one class per image, ``[1, 1]`` meaning class 1 for
both images, as salience's plain list target), and keras-vis's ``filter_indices`` sums whatever it is given by a
loop, a repeat included (``salience.keras_vis`` keeps that, as keras-vis's API). A weighted sum of classes is
``targets.custom(lambda out: 2 * out[:, 1] + out[:, 3])``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, targets


@pytest.mark.parametrize("given, message", [
    ([1, 1], r"multilabel got class 1 twice"),
    ([3, 0, 3, 3], r"multilabel got class 3 3 times"),
    (torch.tensor([2, 5, 2]), r"multilabel got class 2 twice"),
    (torch.tensor([[0, 1], [4, 4]]), r"multilabel got class 4 twice in row 1"),
], ids=["list", "thrice", "tensor", "rows"])
def test_a_class_given_twice_is_refused(given, message):
    with pytest.raises(SalienceError, match=message + r".*a set of classes.*targets\.custom"):
        targets.multilabel(given)


def test_distinct_classes_are_the_sum_and_a_row_may_repeat_another_rows_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.rand(2, 3, 2, 2)
    w = model[1].weight.view(5, 3, 2, 2)
    got = salience.vanilla(model, x, targets.multilabel(torch.tensor([[1, 3], [3, 1]])), reduce=None)
    torch.testing.assert_close(got, (w[1] + w[3]).expand(2, 3, 2, 2))
    several = salience.smoothgrad(model, x, targets.multilabel([0, 4]), samples=3, reduce=None)  # its items' targets
    torch.testing.assert_close(several, (w[0] + w[4]).expand(2, 3, 2, 2))
