"""Session 49's review of the state record's gaps (``git diff f22277d wt-record49-s49``, merged as a311add). Each test
fails on a311add:

1. ``folding._on_shadows`` was a generator's context manager: a Ctrl-C in ``contextlib``'s ``__enter__`` just after
   it replaced ``nn.Module.__getattribute__`` / ``__setattr__`` / ``__delattr__`` (before the ``with`` body) left
   them in place while the traceback was kept (a REPL's ``sys.last_traceback``): every attribute of the model's
   modules read in that thread was its shadow's, every write went there;
2. the guard put back a dict's (an ``OrderedDict``'s) contents but not its order: a forward's ``move_to_end`` (an
   LRU cache) or ``d[k] = d.pop(k)`` kept the call's order, and the next call's map was of that state;
3. the guard put a container back by ``clear()`` then ``extend`` / ``update``: another thread of the user's reading
   the model's list or dict (its own forward) found it empty for that moment (``KeyError``, ``IndexError``), which the
   guard's own dicts never do (``_restore_mapping``).
The maps' reference: plain autograd on a fresh copy of the model.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import salience
from salience._core import folding, guard
from test_s47_split import _Net, _x
from test_s49_record import _direct_forward_model, _vanilla_by_hand


# 1. -------------------------------------------------------------------------------------------------------------
def _redirect_codes() -> set:
    """The code of the trace's redirect: the tracer's ``trace``, the replacements' maker, and contextlib's context
    manager where the trace enters one (a311add's)."""
    made = folding._on_shadows
    codes = {folding.ThisThreadTracer.trace.__code__, getattr(made, "__wrapped__", made).__code__}
    return codes | {contextlib._GeneratorContextManager.__enter__.__code__,
                    contextlib._GeneratorContextManager.__exit__.__code__}


def _in_redirect(frame, codes: set) -> bool:
    """Whether ``frame`` is one of ``codes`` under a :class:`folding.ThisThreadTracer` ``trace`` (contextlib's other
    uses are not looked at)."""
    trace = folding.ThisThreadTracer.trace.__code__
    if frame.f_code is trace:
        return True
    return frame.f_code in codes and frame.f_back is not None and frame.f_back.f_code is trace


def _clean() -> bool:
    """Whether nn.Module's attribute access is torch's own."""
    return "__getattribute__" not in nn.Module.__dict__ and nn.Module.__setattr__ is _SETATTR and \
        nn.Module.__delattr__ is _DELATTR


_SETATTR, _DELATTR = nn.Module.__setattr__, nn.Module.__delattr__


def test_ctrl_c_at_each_point_of_the_traces_redirect_leaves_nn_module_as_torch_made_it(request):
    """Ctrl-C (SIGINT, Python's handler raising ``KeyboardInterrupt``) at each point where Python may run it in the
    redirect's code (``test_hygiene._interruption_points``), the exception kept as a REPL keeps it: nn.Module's
    attribute access is torch's own. On a311add the points just after ``next(self.gen)`` in contextlib's ``__enter__``
    left the redirect in place."""
    from test_hygiene import _interruption_points

    model = _direct_forward_model()
    codes = _redirect_codes()
    points: dict = {}
    passed: list = []

    def scenario() -> None:
        folding.fx_traced(model, None)

    def counting(frame, event, arg):
        if not _in_redirect(frame, codes):
            return None
        frame.f_trace_opcodes = True

        def local(frame, event, arg):
            if event in ("opcode", "call"):
                if frame.f_code not in points:
                    points[frame.f_code] = _interruption_points(frame.f_code)
                if frame.f_lasti in points[frame.f_code]:
                    passed.append((frame.f_code, frame.f_lasti))
            return local
        return local(frame, event, arg)

    gc.collect()
    if gc.isenabled():
        gc.disable()
        request.addfinalizer(gc.enable)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    sys.settrace(counting)
    try:
        scenario()
    finally:
        sys.settrace(None)
    assert _clean() and len(passed) >= 8, passed  # the trace twice (without and with the autocast)
    left = []
    seen: dict = {}
    for point in passed:
        seen[point] = k = seen.get(point, 0) + 1
        count = [0]

        def at(frame, event, arg, point=point, k=k):
            if not _in_redirect(frame, codes):
                return None
            frame.f_trace_opcodes = True

            def local(frame, event, arg):
                if event in ("opcode", "call") and (frame.f_code, frame.f_lasti) == point:
                    count[0] += 1
                    if count[0] == k:
                        sys.settrace(None)
                        signal.raise_signal(signal.SIGINT)
                        return None
                return local
            return local(frame, event, arg)

        kept = []
        sys.settrace(at)
        try:
            scenario()
        except KeyboardInterrupt as e:
            kept.append(e)  # a REPL keeps the last traceback (sys.last_traceback)
        finally:
            sys.settrace(None)
        if not _clean():
            left.append((point[0].co_name, point[1], k))
        kept.clear()
        gc.collect()
        if not _clean():  # not even once the traceback went: put torch's own back for the other tests
            nn.Module.__setattr__, nn.Module.__delattr__ = _SETATTR, _DELATTR
            if "__getattribute__" in nn.Module.__dict__:
                del nn.Module.__getattribute__
    assert not left, f"nn.Module's attribute access left redirected after a Ctrl-C at {left}"
    # and the trace still redirects: nothing of the model written
    traced = folding.fx_traced(model, None)
    assert isinstance(traced, torch.fx.GraphModule) and model.block.calls == 0 and model.block.hist == []


def test_an_error_in_a_traced_forward_leaves_nn_module_as_torch_made_it():
    """Not an a311add failure: a forward that raises mid-trace, and a trace inside the traced forward (a tracer of
    the user's), leave nn.Module's attribute access torch's own."""
    block = nn.Linear(3, 3)
    inner: list = []

    class Raises(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x):
            inner.append(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())))  # a trace inside the trace
            block.forward(x)
            raise RuntimeError("the user's")

    why = folding.fx_traced(Raises(), None)
    assert isinstance(why, str) and "the user's" in why and _clean() and inner


# 2. -------------------------------------------------------------------------------------------------------------
class LruFirst(nn.Module):
    """An LRU cache of two scales: each forward scales by the least recently used one and marks it used
    (``move_to_end``, or ``d[k] = d.pop(k)`` for a plain dict): the next call scales by the other."""

    def __init__(self, kind: type) -> None:
        super().__init__()
        self.cache = kind([("a", torch.tensor(2.0)), ("b", torch.tensor(3.0))])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        k = next(iter(self.cache))
        out = h * self.cache[k]
        if isinstance(self.cache, OrderedDict):
            self.cache.move_to_end(k)
        else:
            self.cache[k] = self.cache.pop(k)
        return out


@pytest.mark.parametrize("kind", [OrderedDict, dict])
@pytest.mark.parametrize("run", [False, True])
def test_guard_puts_back_a_dicts_order(kind, run):
    """On a311add the second call (and the run's) scaled by 3, not 2: the order the first call left stayed."""
    model, x = _Net(LruFirst(kind)).eval(), _x()
    cache = model.pre.cache
    ref = _vanilla_by_hand(_Net(LruFirst(kind)).eval(), x, 1)
    with guard.run_guard(model) if run else contextlib.nullcontext():
        first = salience.vanilla(model, x, 1, reduce=None)
        assert list(model.pre.cache) == ["a", "b"], list(model.pre.cache)
        second = salience.vanilla(model, x, 1, reduce=None)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
    assert model.pre.cache is cache and list(cache) == ["a", "b"] and type(cache) is kind


# 3. -------------------------------------------------------------------------------------------------------------
class _Handoff:
    """An item a forward adds to a container: when the guard's put-back lets it go, the user's other thread reads
    the container (the moment its own forward could), this thread waiting for that read: the race made certain."""

    def __init__(self, ask: threading.Event, answered: threading.Event) -> None:
        self.ask, self.answered = ask, answered

    def __del__(self) -> None:
        self.answered.clear()
        self.ask.set()
        self.answered.wait(2.0)


class Reads(nn.Module):
    """Reads a setting from its dict and its list, and adds an item to each container (changed in place)."""

    def __init__(self, ask: threading.Event, answered: threading.Event) -> None:
        super().__init__()
        self.cfg: dict = {"scale": 2.0}
        self.hist: list = [1.0]
        self.tags: set = {"a"}
        self.events = (ask, answered)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h * self.cfg["scale"] * self.hist[0]
        self.cfg["last"] = _Handoff(*self.events)
        self.hist.append(_Handoff(*self.events))
        self.tags.add(_Handoff(*self.events))
        return out


def test_another_thread_never_finds_a_container_emptied_while_the_guard_puts_it_back():
    """The user's thread reads the model's dict, list and set (what its forward reads) while salience's guard puts
    them back: on a311add it found each emptied (``KeyError``, ``IndexError``, the set without ``'a'``)."""
    ask, answered, stop = threading.Event(), threading.Event(), threading.Event()
    inner = Reads(ask, answered)
    model = nn.Sequential(nn.Linear(4, 4), inner)
    found: list = []

    def user() -> None:
        while not stop.is_set():
            if not ask.wait(0.01):
                continue
            ask.clear()
            try:
                found.append((inner.cfg["scale"], inner.hist[0], "a" in inner.tags))
            except (KeyError, IndexError) as e:
                found.append(type(e).__name__)
            answered.set()

    other = threading.Thread(target=user)
    other.start()
    try:
        for _ in range(3):
            with salience.model_guard(model):
                model(torch.rand(1, 4))
    finally:
        stop.set()
        other.join()
        ask.clear()
        answered.set()
    assert len(found) == 9 and set(found) == {(2.0, 1.0, True)}, found
    assert inner.cfg == {"scale": 2.0} and inner.hist == [1.0] and inner.tags == {"a"}
