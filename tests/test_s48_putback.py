"""Session 48 "putback": the one record of a model's state (salience._core.guard: record_state / state_changes /
put_back_state), which the model guard, Ablation-CAM's split clean pass and the fx trace share, and the three gaps it
closes (each test fails on a6129eb):

a) the model guard put back a plain tensor attribute only by identity: one a forward writes in place
   (``self.seen.fill_(1)``) kept the call's value, and the next call's map differed;
b) Ablation-CAM's split did not tell a list or dict attribute changed in place (``self.hist.append(...)``), so the
   stopped pass ran on the state the first pass left: the map off from the paper's formula;
c) the fx trace of the user's model put back every plain attribute it found changed, another thread's writes of that
   moment too (a counter its forward keeps); now the trace runs on a shadow of the model's modules and writes nothing
   of the model.
The maps are the paper's formula by hand (tests/test_s47_permem.py's reference) or plain autograd on a fresh copy.
"""
import copy
import importlib
import threading

import pytest
import torch
import torch.nn as nn

import salience
from salience._core import folding, guard
from test_s47_split import _Net, _reference, _x

scorecam = importlib.import_module("salience.methods.scorecam")


class SeenAttr(nn.Module):
    """A plain tensor attribute ``seen`` (not a buffer), 0 until the first pass, set to 1 in place by each pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = torch.zeros(())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h * (1 + self.seen)
        self.seen.fill_(1.0)
        return out


def _vanilla_by_hand(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The input gradient of ``model``'s score ``target``, plain autograd, ``(B, C, H, W)``."""
    x = x.clone().requires_grad_(True)
    model(x)[:, target].sum().backward()
    return x.grad


@pytest.mark.parametrize("run", [False, True])
def test_guard_puts_back_a_tensor_attribute_written_in_place(run):
    """(a) On a6129eb ``seen`` stayed 1 after the call, and the second call's map was of the written state."""
    model, x = _Net(SeenAttr()).eval(), _x()
    for p in model.parameters():
        p.requires_grad_(False)
    fresh = _Net(SeenAttr()).eval()
    ref = _vanilla_by_hand(fresh, x, 1)
    if run:
        with guard.run_guard(model):
            first = salience.vanilla(model, x, 1, reduce=None)
            assert torch.equal(model.pre.seen, torch.zeros(())), "the run's baseline put back after the call"
            second = salience.vanilla(model, x, 1, reduce=None)
    else:
        first = salience.vanilla(model, x, 1, reduce=None)
        second = salience.vanilla(model, x, 1, reduce=None)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
    assert torch.equal(model.pre.seen, torch.zeros(()))
    seen = model.pre.seen
    salience.vanilla(model, x, 1)
    assert model.pre.seen is seen  # the user's object, its values put back in place


def test_guard_puts_back_a_tensor_attribute_after_an_exception():
    """(a) Also when the block raises."""
    model = SeenAttr()
    with pytest.raises(RuntimeError, match="boom"):
        with salience.model_guard(model):
            model(torch.ones(2))
            raise RuntimeError("boom")
    assert torch.equal(model.seen, torch.zeros(()))


class History(nn.Module):
    """A list attribute its forward appends to: the first pass adds nothing, every later pass adds 1."""

    def __init__(self) -> None:
        super().__init__()
        self.hist: list = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + min(len(self.hist), 1)
        self.hist.append(0)
        return out


class Stats(nn.Module):
    """A dict attribute its forward fills: the first pass adds nothing, every later pass adds 1."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict = {}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + self.stats.get("seen", 0)
        self.stats["seen"] = 1
        return out


@pytest.fixture
def split_here(monkeypatch):
    """The split allowed at any layer (these small models' layers are not early enough for ``_split_pays``)."""
    monkeypatch.setattr(scorecam, "_split_pays", lambda *a, **k: True)


@pytest.mark.parametrize("state", [History, Stats])
def test_split_tells_a_container_changed_in_place(split_here, state):
    """(b) On a6129eb the first pass's append (or key) was not told: the stopped pass saw it, the map off."""
    model, x = _Net(state()).eval(), _x()
    got = salience.ablationcam(model, x, 1, layer="conv")
    fresh = _Net(state()).eval()
    # session 49: every pass sees the state the call found (perturbation.Found), the reference's S_k passes too:
    # ``pre`` as made before each forward (tests/test_s47_lastread.py's)
    made = copy.deepcopy(fresh.pre)
    fresh.register_forward_pre_hook(lambda m, a: setattr(m, "pre", copy.deepcopy(made)))
    ref = _reference(fresh, fresh.conv, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


class Counting(nn.Module):
    """Counts its forward calls in a plain attribute; in a trace (a proxy input) it lets ``other`` run first."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.calls = 0
        self.other = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy) and self.other is not None:
            self.other()
        self.calls = self.calls + 1
        return self.lin(x)


def test_trace_keeps_another_threads_writes():
    """(c) While this thread traces the model, another runs it (its forward counts its calls): on a6129eb the trace's
    put-back set the count back to what the trace found, the other thread's calls undone."""
    model = Counting().eval()
    x = torch.rand(4, 3)
    runs = []

    def other_thread_runs_the_model() -> None:
        def run() -> None:
            with torch.no_grad():
                model(x)
            runs.append(model.calls)
        t = threading.Thread(target=run)
        t.start()
        t.join()

    model.other = other_thread_runs_the_model
    traced = folding.fx_traced(model, None)
    assert isinstance(traced, torch.fx.GraphModule), traced
    assert len(runs) == 2  # one run of the other thread in each of the two traces
    assert runs == [1, 2]  # the other thread's forward saw its own count, not the trace's
    assert model.calls == 2
    model.other = None
    assert torch.equal(traced(x), model.lin(x))
    assert model.calls == 2  # the trace's module's calls are not the model's forward


def test_trace_writes_nothing_of_the_model():
    """(c) The trace's writes land in its shadow: nothing of the model changes during it, not even for a moment (a
    tensor written in place, a list appended to, an attribute set to an fx proxy)."""
    seen_during: list = []

    class Writer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.seen = torch.zeros(())
            self.hist: list = []
            self.last = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            self.seen.fill_(1.0)
            self.hist.append(1)
            self.last = y
            if isinstance(x, torch.fx.Proxy):  # the model's own dict (in the trace, model.seen reads the shadow's)
                own = object.__getattribute__(model, "__dict__")
                seen_during.append((float(own["seen"]), len(own["hist"]), own["last"]))
            return y

    model = Writer().eval()
    written: set = set()
    traced = folding.fx_traced(model, None, written=written)
    assert isinstance(traced, torch.fx.GraphModule), traced
    assert len(seen_during) >= 2 and set(seen_during) == {(0.0, 0, None)}  # the two traces (and _keep_read's)
    assert float(model.seen) == 0.0 and model.hist == [] and model.last is None
    names = {k for _, k in written}
    assert {"hist", "last"} <= names  # the writes noted (for the fold's settings, session 47)


def test_record_state_round_trip():
    """The facility on its own: what changed is named, and all of it comes back (plain attributes, a tensor written in
    place, a list and a dict changed in place, an attribute added and one deleted, a buffer written and one replaced)."""
    m = nn.Module()
    m.register_buffer("b", torch.zeros(2))
    m.register_buffer("c", torch.ones(2))
    m.t, m.xs, m.d, m.n, m.gone = torch.zeros(3), [1, 2], {"a": 1}, 5, "x"
    t, xs, d, b, c = m.t, m.xs, m.d, m.b, m.c
    record = guard.record_state([m], containers=True)
    assert guard.state_changes(record) == []
    m.t.add_(1)
    m.xs.append(3)
    m.d["b"] = 2
    m.n = 6
    m.new = 1
    del m.gone
    m.b.fill_(7)
    m.c = torch.full((2,), 9.0)
    assert sorted(guard.state_changes(record)) == sorted(
        [(0, "t"), (0, "xs"), (0, "d"), (0, "n"), (0, "new"), (0, "gone"), (0, "b"), (0, "c")])
    guard.put_back_state(record)
    assert guard.state_changes(record) == []
    assert m.t is t and torch.equal(t, torch.zeros(3))
    assert m.xs is xs and xs == [1, 2] and m.d is d and d == {"a": 1}
    assert m.n == 5 and m.gone == "x" and not hasattr(m, "new")
    assert m.b is b and torch.equal(b, torch.zeros(2)) and m.c is c and torch.equal(c, torch.ones(2))
