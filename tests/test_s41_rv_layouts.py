"""Review of the run's kept channels-last copies (``salience._core.layouts``, session 41): a Ctrl-C inside
the keeping's own entry or exit (``layouts.open_copies`` / ``close_copies``, in the run guard since session 42)
leaves nothing kept, and a run keeps no copy of a parameter that is gone (the
folded copy made again each batch)."""
from __future__ import annotations

import signal
import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import layouts
from salience._core.guard import run_guard
from test_s40_run_bf16 import images, net


class _InterruptingLock:
    """``layouts._lock``'s stand-in: a SIGINT (what Ctrl-C sends) on its ``at``-th use, ``("exit", 1)``: when it is
    released the first time (the block's entry, the copies' dict just registered), ``("enter", 2)``: when it is
    taken the second time (the block's exit, before the dict is dropped)."""

    def __init__(self, real, at: tuple[str, int]):
        self.real, self.at, self.uses = real, at, {"enter": 0, "exit": 0}

    def _use(self, what: str) -> None:
        self.uses[what] += 1
        if (what, self.uses[what]) == self.at:
            signal.raise_signal(signal.SIGINT)

    def __enter__(self):
        self.real.acquire()
        try:
            self._use("enter")
        except BaseException:
            self.real.release()  # as a real lock's ``with``: not taken when its entry raised
            raise
        return self

    def __exit__(self, *exc):
        self.real.release()
        self._use("exit")
        return False


@pytest.mark.parametrize("at", [("exit", 1), ("enter", 2)], ids=["entry", "exit"])
def test_a_ctrl_c_in_kept_layouts_own_entry_or_exit_leaves_nothing_kept(monkeypatch, at):
    """A Ctrl-C that lands in the block's bookkeeping (after the dict is registered and before the body's ``try``;
    in the exit before the dict is dropped) still raises ``KeyboardInterrupt``, and nothing stays kept: a dict left
    behind kept the model's copies for good, so that every later call on it (outside any run) reused them, blind to a
    change through ``p.data``, and a later run on the model (or on one given its id) never dropped them."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    model = net()
    p = model[0].weight
    monkeypatch.setattr(layouts, "_lock", _InterruptingLock(layouts._lock, at))
    try:
        with pytest.raises(KeyboardInterrupt):
            with run_guard(model):
                layouts.channels_last_data(model, p, p.data)
        monkeypatch.undo()
        assert layouts._kept == {}
    finally:
        layouts._kept.pop(id(model), None)  # not left to the other tests
    a = layouts.channels_last_data(model, p, p.data)
    p.data.mul_(2)  # a change no version counter sees: outside a run, the next call copies the new values
    assert torch.equal(layouts.channels_last_data(model, p, p.data), a * 2)


class _Counting(nn.Module):
    """Two convolutions, each followed by a BatchNorm (``fold_batchnorm`` folds them), and a buffer the forward
    writes in place (a call counter): each call whose passes run the model itself (Grad-CAM's, hooked) writes it and
    its guard puts it back, so the next call's folded copy is made again (its key: the buffers' versions)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.head(self.f(x).mean((2, 3)))


def test_a_run_keeps_no_copies_of_parameters_that_are_gone(tmp_path, monkeypatch):
    """A ``fold_batchnorm`` channels-last run of vanilla and Grad-CAM whose folded copy is made again every batch: at
    the run's end the kept copies are those of the model's two 3x3 weights and of the last folded copy's two (4), not
    two more for every batch's folded copy, gone since (the code before: 14 after 6 batches, each dead folded copy's
    weights and their copies held for the run's length: on resnet50 about 90 MB a batch)."""
    from conftest import unchanged
    from salience._core.info import ModelInfo, attach_info

    torch.manual_seed(0)
    model = _Counting().eval()
    attach_info(model, ModelInfo(name="counting", input_size=(16, 16)))
    kept_at_end = []
    real = layouts.close_copies

    def spy(box):
        if box:
            kept_at_end.append(len(box[0][1]))
        real(box)

    monkeypatch.setattr(layouts, "close_copies", spy)
    files = images(tmp_path / "imgs", n=12)
    with unchanged(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        salience.explain_dataset(model, files, ["vanilla", "gradcam"], tmp_path / "run", batch_size=2, shard_size=4, workers=0,
                                 target=1, model_spec="counting", memory_format="channels_last", fold_batchnorm=True)
    assert kept_at_end == [4]
    assert layouts._kept == {}
