"""Review of the Score-CAM / RISE bf16 merge (issue 15, session 42): the reused masked-input buffer never overwrites
an input that something still holds (a hook of the user's that keeps the model's input), and a Ctrl-C as a run
closes does not leave the process's folded copy channels-last."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import engine as _engine
from salience._core import folding as _folding
from salience._core import perf as _perf
from salience.methods.perturbation import _Reused


@pytest.fixture(autouse=True)
def _fresh():
    _perf.clear_cache()
    yield
    _perf.clear_cache()


def _net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(4)] if bn else []
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def test_reused_buffer_is_reused_while_nothing_else_holds_it():
    x = torch.rand(3, 2, 4, 4)
    inputs = _Reused(x)
    first = inputs.rows(torch.tensor([0, 1]))
    assert torch.equal(first, x[[0, 1]])
    ptr = first.data_ptr()
    del first
    again = inputs.rows(torch.tensor([2, 0]))
    assert again.data_ptr() == ptr and torch.equal(again, x[[2, 0]])


def test_reused_buffer_is_not_overwritten_while_held():
    """A view of the buffer still held (a hook kept the model's input): the next rows go into a fresh buffer."""
    x = torch.rand(3, 2, 4, 4)
    inputs = _Reused(x)
    held = inputs.rows(torch.tensor([0, 1]))[:1]  # a view, as a hook's ``inp[0][:1]``
    inputs.rows(torch.tensor([2, 2]))
    assert torch.equal(held, x[:1])


@pytest.mark.parametrize("method", ["rise", "scorecam"])
def test_inputs_a_hook_keeps_are_not_overwritten_by_later_passes(method):
    """A forward pre-hook of the user's that keeps each input the model gets (a recorder of what the model saw): each
    one must stay what the model was given. The merge handed the model one reused buffer, so every kept input of
    the masked passes became the last chunk's images."""
    model, x = _net(), torch.rand(2, 3, 8, 8)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = model.register_forward_pre_hook(lambda m, inp: kept.append((inp[0], inp[0].clone())))
    try:
        if method == "rise":
            salience.rise(model, x, target=0, masks=6, chunk=2)
        else:
            salience.scorecam(model, x, target=0, layer="0", chunk=2)
    finally:
        handle.remove()
    assert len(kept) > 3
    assert all(torch.equal(seen, then) for seen, then in kept)


def _interrupted_close(monkeypatch, call) -> list[bool]:
    """Run ``call()`` under fold + channels-last with a Ctrl-C at the first ``Run.close``'s start (before it put the
    layouts back); check that the process's folded copy and the model are contiguous after. Returns, per close, whether
    the run held the folded copy converted."""
    model = _net(bn=True)
    close, ran = _perf.Run.close, []

    def interrupted(self):
        ran.append(self._folded is not None and bool(self._saved))
        if len(ran) == 1:
            raise KeyboardInterrupt
        close(self)

    monkeypatch.setattr(_perf.Run, "close", interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with salience.performance(fold_batchnorm=True, memory_format="channels_last"), \
                pytest.raises(KeyboardInterrupt):
            call(model, torch.rand(2, 3, 8, 8))
    folded = _folding._folded[(id(model), None)][2]
    assert isinstance(folded, nn.Module)
    convs = [p for p in folded.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)
    assert all(p.is_contiguous() for p in model.parameters())
    return ran


def test_ctrl_c_as_the_run_closes_leaves_the_folded_copy_contiguous(monkeypatch):
    """A Ctrl-C at ``Run.close``'s start: the engine's ``finally`` ran close once, so the process's cached folded
    copy stayed channels-last (converted in place), and every later call on the model ran it so, also
    ``memory_format="contiguous"`` ones. Close now runs with Ctrl-C deferred, and again if it raised."""
    ran = _interrupted_close(monkeypatch, lambda model, x: salience.rise(model, x, target=0, masks=8, chunk=4))
    assert ran[0]


def test_explicit_budget_and_chunk_win_under_bf16():
    """``max_memory`` and ``chunk`` are the caller's: the low-precision default does not cut them."""
    model, x = _net(), torch.rand(1, 3, 8, 8)

    def compute(start: int, stop: int) -> torch.Tensor:
        torch.empty(stop - start, 1 << 20).fill_(1)  # 4 MiB an item, seen by the memory probe
        return torch.ones(stop - start, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _perf.Run(model, x, _perf.resolve(precision="bf16"), tag="s42rv")
    sums = _engine.accumulate(compute, 60, 1, device=torch.device("cpu"), inference=True, run=run,
                              max_memory=128 << 20)
    assert max(sums.chunks[1:]) == 25  # 0.8 * 128 MiB / 4 MiB, as fp32's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _perf.Run(model, x, _perf.resolve(precision="bf16"), tag="s42rv")
    sums = _engine.accumulate(compute, 60, 1, device=torch.device("cpu"), inference=True, run=run, chunk=30)
    assert max(sums.chunks) == 30


def test_an_exception_inside_the_restore_leaves_nothing_channels_last():
    """An exception at each line of ``Run._restore`` (a Ctrl-C that Python raised from a trace here, a MemoryError
    of a conversion): the second try puts back what the first did not. ``_restore`` popped each parameter before
    putting it back, so the one popped was lost (the folded copy's stayed channels-last in the process's cache)."""
    import sys

    model, x = _net(bn=True), torch.rand(2, 3, 8, 8)
    for k in range(1, 40):
        lines, fired = [0], []

        def trace(frame, event, arg):
            if frame.f_code.co_name != "_restore" or not frame.f_code.co_filename.endswith("perf.py"):
                return None

            def local(frame, event, arg):
                if event == "line":
                    lines[0] += 1
                    if lines[0] == k and not fired:
                        fired.append(frame.f_lineno)
                        raise KeyboardInterrupt
                return local
            return local

        sys.settrace(trace)
        try:
            with warnings.catch_warnings(), salience.performance(fold_batchnorm=True, memory_format="channels_last"):
                warnings.simplefilter("ignore")
                salience.rise(model, x, target=0, masks=8, chunk=4)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if not fired:
            break
        folded = _folding._folded[(id(model), None)][2]
        assert all(p.is_contiguous() for p in folded.parameters()), (k, fired)
        assert all(p.is_contiguous() for p in model.parameters())
    assert k > 3  # _restore's lines were reached


def test_ctrl_c_as_a_one_pass_run_closes_leaves_the_folded_copy_contiguous(monkeypatch):
    """The same for a single pass's run (``perf.one_pass``: vanilla's input gradient on the folded copy), which
    closed its run with a plain ``run.close()`` too."""
    ran = _interrupted_close(monkeypatch, lambda model, x: salience.vanilla(model, x, target=0))
    assert ran[0]  # the run held the folded copy, converted
