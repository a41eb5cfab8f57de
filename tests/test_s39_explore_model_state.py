"""The explorer leaves the user's models as it found them: their train / eval flags (the methods run
each pass in eval mode under the guard, so the page needs no ``model.eval()`` of its own), and a
model that fails to load among the compared ones stops the workers already started."""
from __future__ import annotations

import threading

import pytest
import torch

from salience import SalienceError
from salience.demo.zoo import load_demo
from salience.explore.server import build_hub


def _explore_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("salience-explore")}


def test_a_model_in_train_mode_comes_back_in_train_mode_and_is_explained_in_eval_mode():
    model = load_demo("shapes").train()
    flags = {n: m.training for n, m in model.named_modules()}
    hub = build_hub(model)
    try:
        assert {n: m.training for n, m in model.named_modules()} == flags  # not switched by the page
        slot = hub.slots["a"]
        x = torch.rand(1, 3, *slot.size)
        assert {n: m.training for n, m in model.named_modules()} == flags
        # the scores the page shows are eval mode's (BatchNorm's running statistics), whatever the flags
        from salience._core.autograd import forward_scores
        expected = model.eval()(x).detach()
        model.train()
        for n, m in model.named_modules():
            m.training = flags[n]
        assert torch.allclose(forward_scores(slot.model, x, strip_softmax=False), expected, atol=1e-6)
    finally:
        hub.close()
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_a_compared_model_that_fails_to_load_stops_the_workers_already_started():
    before = _explore_threads()
    with pytest.raises(SalienceError):
        build_hub("demo:shapes", compare=["demo:shapes-regression", "demo:no-such-model"])
    for t in _explore_threads() - before:
        t.join(5)
    assert not {t for t in _explore_threads() - before if t.is_alive()}
