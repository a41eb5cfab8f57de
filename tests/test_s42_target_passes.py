"""SmoothGrad over K targets of a method that takes one target a call (a user's function, not marked
``several_targets``) calls it K times on each noisy copy: K x the passes of one target. The many-pass cap
(``engine.check_passes``, through SmoothGrad's check of the signature and ``engine.passes_within`` /
``check_copies`` inside) counted one target's (session 42)."""
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import engine


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


def test_a_count_the_signature_shows_is_multiplied_by_the_targets():
    # 300 copies x 2,000 steps = 600,000 passes of each image a target; 2 targets, a call each: 1,200,000
    def per_target(model, x, target, *, steps=2000):
        return salience.integrated_gradients(model, x, target, steps=steps)

    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), torch.tensor([[0, 1]]), method=per_target, samples=300)
    said = str(e.value)
    assert "samples=300 of per_target with steps=2000 for each of 2 targets (a call each) is 1,200,000 passes" in said
    assert "more than the 1,000,000 passes of each image" in said


def test_a_count_inside_a_function_is_multiplied_by_the_targets():
    # a wrapper the signature cannot see through: RISE's own check counts 200 copies x 2 targets x 3,000 masks
    def wrapped(model, x, target):
        return salience.rise(model, x, target, masks=3000)

    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), torch.tensor([[0, 1]]), method=wrapped, samples=200)
    said = str(e.value)
    assert ("RISE's 3,000 masks in each of 200 noisy copies (SmoothGrad's samples) for each of 2 targets (a call "
            "each) are 1,200,000 passes of each image") in said


def test_the_outer_count_is_the_copies_times_the_calls_of_each():
    """Inside the method, ``outer_passes`` is how many times each image's call runs: 3 copies x 2 targets (a call
    each) = 6; a method that takes the K targets in one call (vanilla, marked) runs once a copy: 3."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(2, 3, 4, 4)
    seen = []

    def one_target(model, x, target):
        seen.append(engine.outer_passes())
        return salience.vanilla(model, x, target)

    two = torch.tensor([[0, 2], [0, 2]])  # (B, K): 2 targets of each image
    got = salience.smoothgrad(model, x, two, method=one_target, samples=3, noise=0.0)
    assert seen and set(seen) == {6}
    torch.testing.assert_close(got, salience.smoothgrad(model, x, two, samples=3, noise=0.0))

    def several(model, x, target):
        seen.append(engine.outer_passes())
        return salience.vanilla(model, x, target)

    several.several_targets = True  # what salience.methods._multi.several_targets marks
    seen.clear()
    salience.smoothgrad(model, x, two, method=several, samples=3, noise=0.0)
    assert seen and set(seen) == {3} and engine.outer_passes() == 1
