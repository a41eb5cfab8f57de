"""Integrated gradients' ``steps`` has a ceiling per rule, refused before anything is built: the rules'
nodes and weights are lists of ``steps`` floats (``steps=10**30`` ran the process out of memory before any
pass, as the explorer's audit found), and Gauss-Legendre's come from an n x n eigenproblem (4,000 points
took 26 s). Below the ceilings the rules are what they were: their weights sum to 1."""
from __future__ import annotations

import time

import pytest
import torch

import salience
from salience import SalienceError
from salience.methods.integrated import MAX_STEPS, MAX_STEPS_GAUSS, RULES, quadrature


@pytest.mark.parametrize("rule", RULES)
def test_absurd_steps_are_refused_at_once_with_the_rules_ceiling(rule):
    limit = MAX_STEPS_GAUSS if rule == "gausslegendre" else MAX_STEPS
    start = time.perf_counter()
    said = "points" if rule == "gausslegendre" else "passes of each image"  # the engine's cap, said as every count's
    with pytest.raises(SalienceError, match=f"steps={limit + 1}.* is more than the {limit:,} {said}"):
        quadrature(rule, limit + 1)
    with pytest.raises(SalienceError, match="more than"):
        salience.integrated_gradients(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.rand(1, 3, 2, 2),
                                      target=0, steps=10 ** 30, rule=rule)
    assert time.perf_counter() - start < 60  # refused before the lists: a hang or an out-of-memory is what fails


@pytest.mark.parametrize("rule", RULES)
def test_the_rules_at_their_ceiling_still_sum_to_one(rule):
    limit = MAX_STEPS_GAUSS if rule == "gausslegendre" else MAX_STEPS
    nodes, weights = quadrature(rule, limit)
    assert len(nodes) == len(weights) == limit
    assert abs(sum(weights) - 1.0) < 1e-9
    assert 0.0 <= min(nodes) and max(nodes) <= 1.0
