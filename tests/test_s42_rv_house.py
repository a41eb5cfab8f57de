"""Review of session 42's house merge (482cdb7): SmoothGrad's many-pass cap over K targets (``engine.passes_within``
counts the copies and the calls of each apart) and what its refusals say."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


def test_an_inner_smoothgrads_refusal_tells_the_copies_from_the_targets_around_it():
    """A SmoothGrad inside a function (its count hidden from the outer one's signature check) under an outer
    SmoothGrad of 100 copies and 2 targets, a call each: 100 x 2 x 10 x 1,000 = 2,000,000 passes of each image,
    refused by the inner check. It said "within 200 noisy copies of the SmoothGrad around it": the 2 targets'
    calls counted as noisy copies (``outer_passes``, the product), where ``engine.check_copies`` says them apart."""
    def wrapped(model, x, target):
        return salience.smoothgrad(model, x, target, method=salience.rise, samples=10, masks=1000)

    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), torch.tensor([[0, 1]]), method=wrapped, samples=100)
    said = str(e.value)
    assert "2,000,000 passes of each image" in said
    assert "within 100 noisy copies" in said and "200 noisy copies" not in said, said
    assert "for each of 2 targets (a call each)" in said, said
