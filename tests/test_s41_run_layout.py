"""A dataset run under ``memory_format="channels_last"`` copies each 4-D weight to channels-last once per run, not
once per call (issue 17, session 41: kept by the run's guard since session 42, ``salience._core.layouts.open_copies``); the maps are the bits of a run that
copies them every call, and the model comes back exactly as it was, after the run and after a Ctrl-C in it."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import salience
from salience._core import layouts
from salience._core.guard import run_guard
from test_s40_run_bf16 import images, net

KW = dict(batch_size=2, shard_size=2, workers=0, target=1, model_spec="net3", memory_format="channels_last",
          method_options={"integrated_gradients": {"steps": 8}})
METHODS = ["vanilla", "integrated_gradients"]


@contextlib.contextmanager
def weight_copies(model):
    """Count the channels-last copies made of ``model``'s convolution weights (``Tensor.contiguous`` with that
    format on a tensor of a weight's shape: the inputs are (B, 3, 16, 16), no weight's), in ``counts[0]``."""
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 4}
    counts = [0]
    real = torch.Tensor.contiguous

    def counting(t, *args, **kwargs):
        if kwargs.get("memory_format", args[0] if args else None) is torch.channels_last and tuple(t.shape) in shapes:
            counts[0] += 1
        return real(t, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "contiguous", counting)
        yield counts


def test_a_channels_last_run_copies_each_weight_once_and_keeps_the_bits(tmp_path, monkeypatch):
    """8 images in 4 batches, each with a prediction pass, vanilla's and integrated gradients' chunks: every call
    converted the 3 convolution weights before (36 copies here); now each is copied once for the run (3). The maps
    are the same float16 bits as a run that copies every call (``layouts.open_copies`` made a no-op: the code before),
    and the kept copies are dropped at the run's end."""
    from conftest import unchanged

    model = net().train()  # train mode, parameters requiring gradients: both come back
    files = images(tmp_path / "imgs", n=8)
    before = layouts.copies_made()
    with unchanged(model), weight_copies(model) as counts:
        run = salience.explain_dataset(model, files, METHODS, tmp_path / "kept", **KW)
    assert counts[0] == 3 and layouts.copies_made() - before == 3, counts
    assert layouts._kept == {}
    monkeypatch.setattr(layouts, "open_copies", lambda model, box: None)
    with weight_copies(model) as counts:
        ref = salience.explain_dataset(model, files, METHODS, tmp_path / "every", **KW)
    assert counts[0] > 3 * 8, counts  # every call's
    for m in METHODS:
        for i in range(len(files)):
            assert np.array_equal(run.map(i, m), ref.map(i, m)), (m, i)


def test_a_ctrl_c_mid_run_leaves_the_model_as_it_was_and_drops_the_copies(tmp_path):
    """A Ctrl-C in the second batch's vanilla pass (a channels-last pass: the weights are the kept copies then): the
    model's parameters come back with the user's storage and strides (``data_ptr``, ``stride``), values,
    ``requires_grad`` and the modules' training flags, and nothing is kept after."""
    from conftest import unchanged

    model = net().train()
    files = images(tmp_path / "imgs", n=8)
    calls = [0]

    def interrupt(module, args):
        if args[0].shape[0] > 1:  # the batches' passes, not the run's one-image probes
            calls[0] += 1
            if calls[0] == 6:  # batch 2: prediction 5, vanilla 6 (then IG's probe chunk, contiguous, and its steps)
                assert module.weight.is_contiguous(memory_format=torch.channels_last)
                raise KeyboardInterrupt

    handle = model[0].register_forward_pre_hook(interrupt)
    try:
        with unchanged(model), pytest.raises(KeyboardInterrupt):
            salience.explain_dataset(model, files, METHODS, tmp_path / "run", **KW)
    finally:
        handle.remove()
    assert calls[0] == 6 and layouts._kept == {}
    assert model.training and all(p.requires_grad and p.is_contiguous() for p in model.parameters())


def test_a_kept_copy_is_used_only_while_its_weight_is_unchanged():
    """Inside a run guard (which keeps the copies: ``layouts.open_copies``) the copy of a parameter's data is made once and given again while the parameter holds
    the same tensor and its version counter did not move; an in-place change (``mul_`` under ``no_grad``, as an
    optimizer's step) or new data make a fresh copy of the new values; outside the block every call copies."""
    model = net()
    p = model[0].weight
    with run_guard(model):
        a = layouts.channels_last_data(model, p, p.data)
        assert layouts.channels_last_data(model, p, p.data) is a
        assert a.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, p)
        with torch.no_grad():
            p.mul_(2)
        b = layouts.channels_last_data(model, p, p.data)
        assert b is not a and torch.equal(b, p)
        p.data = p.data.clone()
        c = layouts.channels_last_data(model, p, p.data)
        assert c is not b and torch.equal(c, p)
    assert layouts._kept == {}
    assert layouts.channels_last_data(model, p, p.data) is not layouts.channels_last_data(model, p, p.data)


def test_a_forward_that_changes_its_weight_in_place_gets_the_bits_of_every_call_copying(tmp_path, monkeypatch):
    """A model whose forward scales its first weight in place (under ``no_grad``, on the channels-last copy during
    a pass): the change moves the parameter's version counter, so the next call copies the user's weights afresh,
    as every call did before; the maps equal a run that copies every call."""
    def scaling() -> torch.nn.Module:  # a fresh model for each run: the contiguous passes change its weight for good
        model = net()

        def scale(module, args):
            with torch.no_grad():
                module.weight.mul_(1.5)

        model[0].register_forward_pre_hook(scale)
        return model

    files = images(tmp_path / "imgs", n=6)
    run = salience.explain_dataset(scaling(), files, METHODS, tmp_path / "kept", **KW)
    monkeypatch.setattr(layouts, "open_copies", lambda model, box: None)
    ref = salience.explain_dataset(scaling(), files, METHODS, tmp_path / "every", **KW)
    for m in METHODS:
        for i in range(len(files)):
            assert np.array_equal(run.map(i, m), ref.map(i, m)), (m, i)
