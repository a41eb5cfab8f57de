"""Session 59, the lead's own: the public methods' signatures read once (``_multi.checked`` keeps
``__signature__``), so a call's option checks do not rebuild them: a SmoothGrad call built ``inspect``'s signature of
its method from the function eight times (about 20 us each) before; none now. Fails before: the count is 8."""
import inspect

import torch
from torch import nn

import salience
from salience.methods import METHODS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def test_every_public_method_keeps_its_implementation_signature():
    for name, fn in METHODS.items():
        kept = fn.__dict__.get("__signature__")
        assert kept is not None, name
        assert kept == inspect.signature(inspect.unwrap(fn)), name
        assert inspect.signature(fn) is kept, name


def test_a_smoothgrad_call_builds_no_signature_from_a_function(monkeypatch):
    m, x = _model(), torch.rand(1, 3, 16, 16)
    salience.smoothgrad(m, x, 2, samples=4)  # warm
    built = []
    real = inspect._signature_from_function

    def counting(*args, **kwargs):
        built.append(getattr(args[1], "__name__", "?"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect, "_signature_from_function", counting)
    want = salience.smoothgrad(m, x, 2, samples=4, seed=1)
    assert built == []
    monkeypatch.undo()
    assert torch.equal(want, salience.smoothgrad(m, x, 2, samples=4, seed=1))


def test_a_refused_keyword_still_names_the_options():
    m, x = _model(), torch.rand(1, 3, 16, 16)
    try:
        salience.smoothgrad(m, x, 2, samples=4, sample=3)
    except TypeError as e:
        assert "samples" in str(e)
    else:
        raise AssertionError("an unknown keyword was taken")
