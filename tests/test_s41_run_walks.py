"""What a dataset run's method calls repeat per call (issue 17, session 41): a one-pass method's call checked its
input twice (``input_gradient_maps``' ``check_input``, then ``backward``'s on the same ``x``: a finiteness test over
the batch and a walk of the model for its dtype each) and walked the model's modules in every ``Run`` for whether it
is convolutional. Now the input is checked once a call and the convolutional answer is kept with the model's
``structure()`` (the modules' classes are in it); the maps are the bits of the code that checked twice, and the model
comes back exactly as it was after the run and after an error in it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience._core import autograd, engine, perf
from salience._core.errors import SalienceError
from test_s40_run_bf16 import images, net

KW = dict(batch_size=2, shard_size=2, workers=0, model_spec="net3", precision="bf16", memory_format="channels_last")


def counting(monkeypatch, module, name: str, *, not_from: str = "") -> list:
    """Count the calls of ``module.name`` (looked up at each call by its callers), in the returned list's [0];
    ``not_from``: calls made by the function of that name (or a generator expression in it) left out."""
    real, counts = getattr(module, name), [0]

    def counted(*args, **kwargs):
        callers = (sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name)
        counts[0] += not_from not in callers
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return counts


def test_a_run_checks_each_batch_once_and_asks_once_whether_the_model_is_convolutional(tmp_path, monkeypatch):
    """8 images in 4 batches of vanilla (its pass gives the prediction too) under bf16 and channels-last: the
    finiteness test ran twice a call before (8), once now (4); the model's dtype walk three times a batch (the
    run's ``model_input``, both checks), twice now; ``_is_convolutional`` once a call (4), once a run now. The maps
    are the float16 bits of a run whose ``backward`` checks again (the code before)."""
    perf.clear_cache()
    files = images(tmp_path / "imgs", n=8)
    model = net()
    # the input's finiteness (the target scores' own check reads _all_finite too on a CPU since session 59: not counted)
    finite = counting(monkeypatch, autograd, "_all_finite", not_from="_finite_scores")
    dtype = counting(monkeypatch, autograd, "_compute_dtype")
    conv = counting(monkeypatch, perf, "_is_convolutional")
    run = salience.explain_dataset(model, files, ["vanilla"], tmp_path / "now", **KW)
    assert (finite[0], dtype[0], conv[0]) == (4, 1 + 2 * 4, 1), (finite, dtype, conv)  # 1: the run's setup

    real = engine.backward
    monkeypatch.setattr(engine, "backward", lambda *a, checked=False, **k: real(*a, **k))  # every call checks twice
    perf.clear_cache()
    finite[0] = 0
    ref = salience.explain_dataset(model, files, ["vanilla"], tmp_path / "twice", **KW)
    assert finite[0] == 8
    for i in range(len(files)):
        assert np.array_equal(run.map(i, "vanilla"), ref.map(i, "vanilla")), i


def test_the_model_comes_back_exactly_after_the_run_and_after_an_error_in_it(tmp_path):
    """Train mode and parameters requiring gradients: as they were after the run, and after a RuntimeError and a
    Ctrl-C in the third batch's pass (storage, strides, values, flags, hooks: ``conftest.unchanged``)."""
    from conftest import unchanged

    files = images(tmp_path / "imgs", n=8)
    model = net().train()
    with unchanged(model):
        salience.explain_dataset(model, files, ["vanilla"], tmp_path / "ok", **KW)
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        calls = [0]

        def fail(module, args):
            if args[0].shape[0] > 1:  # the batches' passes, not the run's one-image probes
                calls[0] += 1
                if calls[0] == 3:
                    raise error

        handle = model[0].register_forward_pre_hook(fail)
        try:
            with unchanged(model), pytest.raises(type(error)):
                salience.explain_dataset(model, files, ["vanilla"], tmp_path / type(error).__name__, **KW)
        finally:
            handle.remove()
        assert calls[0] == 3
    assert model.training and all(p.requires_grad and p.is_contiguous() for p in model.parameters())


def test_an_input_is_still_checked_where_no_caller_checked_it():
    """``backward`` and ``engine.input_gradients`` called without ``checked`` test the input themselves, and a
    one-pass method still refuses a NaN input and an input of another dtype than the model's."""
    model = net()
    x = torch.rand(2, 3, 16, 16)
    x[1, 0, 3, 4] = float("nan")
    target = [salience.targets.classes(0)]
    for call in (lambda: salience.vanilla(model, x, 0),
                 lambda: salience.input_x_gradient(model, x, 0),
                 lambda: autograd.backward(model, x, target),
                 lambda: engine.input_gradients(model, x, target)):
        with pytest.raises(SalienceError, match="NaN or infinite"):
            call()
    with pytest.raises(SalienceError, match="computes in torch.float32"):
        salience.vanilla(model, torch.rand(2, 3, 16, 16, dtype=torch.float64), 0)


def test_the_convolutional_answer_follows_a_model_changed_between_calls():
    """Outside a run: a model whose third convolution is replaced between calls is asked again (its structure
    changed), and so is one given its convolution back; the same structure reuses the answer."""
    perf.clear_cache()
    model = net()
    x = torch.rand(2, 3, 16, 16)
    options = perf.resolve(memory_format="channels_last")
    assert perf.Run(model, x, options, tag="t").convolutional is True
    conv = model[4]
    model[4] = nn.Identity()
    assert perf.Run(model, x, options, tag="t").convolutional is False
    model[4] = conv
    assert perf.Run(model, x, options, tag="t").convolutional is True
