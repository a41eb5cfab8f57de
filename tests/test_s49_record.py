"""Session 49 "record": the state record's open gaps (salience._core.guard, salience._core.folding). Each test fails on
9707fe5 (the guard's record of session 48):

a) the model guard did not put back the contents of a list, dict or set attribute a forward changes in place
   (``self.hist.append(...)``, ``self.stats["k"] = ...``): the next call's map was of the written state; now a module
   not from torch.nn has its containers copied up to ``guard._CONTENTS_LIMIT`` items, and one over it that a call
   changes is told (a warning naming it);
b) nor an inference-tensor attribute written in place (a forward under ``torch.inference_mode()``: no version
   counter): now copied (up to 1 MiB) and told by its values;
c) a closure calling ``module.forward(...)`` directly (not ``module(...)``) ran on the model during an fx trace: its
   writes landed on the model; now every attribute read, write and delete of the model's modules in the tracing
   thread goes to their shadows for the trace (``folding._on_shadows``);
d) ``guard.put_back_state`` of a record made with ``own_dicts=False`` ran a half copy of ``_restore_mapping``; now
   refused.
The maps are plain autograd on a fresh copy of the model.
"""
import contextlib
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

import salience
from salience._core import folding, guard
from salience._core.guard import containers
from test_s47_split import _Net, _x


class ForwardLog(list):
    """A list a test model's forward appends to, to count its passes, that the model guard leaves as the passes left
    it: not exactly a list (the guard copies and puts back the contents of a ``list``, ``dict`` or ``set`` attribute
    of a module not from torch.nn, by its exact type: the user's own log of the passes came back empty)."""


class ForwardNotes(dict):
    """A dict a test model's forward writes to, to note its passes, left as the passes left it (:class:`ForwardLog`)."""


class Containers(nn.Module):
    """A list, a dict and a set its forward changes in place: the first pass adds nothing to the output, every later
    pass adds 1 (each read of its state)."""

    def __init__(self) -> None:
        super().__init__()
        self.hist: list = []
        self.stats: dict = {}
        self.tags: set = set()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + min(len(self.hist), 1) + self.stats.get("seen", 0) + len(self.tags)
        self.hist.append(0)
        self.stats["seen"] = 1
        self.tags.add("seen")
        return out


def _vanilla_by_hand(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The input gradient of ``model``'s score ``target``, plain autograd, ``(B, C, H, W)``."""
    x = x.clone().requires_grad_(True)
    model(x)[:, target].sum().backward()
    return x.grad


def _state(m: Containers) -> tuple:
    return list(m.hist), dict(m.stats), set(m.tags)


def _two_calls(model: nn.Module, x: torch.Tensor, run: bool, between: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vanilla maps of ``model`` at class 1, in one run guard (``run``, ``between()`` checking its baseline put
    back after the first) or each under a guard of its own."""
    with guard.run_guard(model) if run else contextlib.nullcontext():
        first = salience.vanilla(model, x, 1, reduce=None)
        if run:
            between()
        second = salience.vanilla(model, x, 1, reduce=None)
    return first, second


@pytest.mark.parametrize("run", [False, True])
def test_guard_puts_back_containers_changed_in_place(run):
    """(a) On 9707fe5 the list, dict and set kept the call's items, and the second call's map was of that state."""
    model, x = _Net(Containers()).eval(), _x()
    model.pre.hist.append(5)  # the user's own items stay, the same objects
    hist, stats, tags = model.pre.hist, model.pre.stats, model.pre.tags
    fresh = _Net(Containers()).eval()
    fresh.pre.hist.append(5)
    ref = _vanilla_by_hand(fresh, x, 1)
    def between() -> None:
        assert _state(model.pre) == ([5], {}, set()), "the run's baseline put back after the call"

    first, second = _two_calls(model, x, run, between)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
    assert _state(model.pre) == ([5], {}, set())
    assert model.pre.hist is hist and model.pre.stats is stats and model.pre.tags is tags  # the user's objects


@pytest.mark.parametrize("kind", ["containers", "inference tensor"])
def test_guard_puts_back_after_an_exception(kind):
    """(a, b) Also when the block raises."""
    model = Containers() if kind == "containers" else InferenceSeen()
    try:
        with salience.model_guard(model):
            model(torch.ones(2))
            raise KeyError("the user's error")
    except KeyError:
        pass
    assert (_state(model) == ([], {}, set())) if kind == "containers" else float(model.seen) == 0.0


def test_guard_tells_a_container_over_the_limit():
    """(a) A list over ``_CONTENTS_LIMIT`` items is not copied (its cost per call): a call that appends to it keeps
    the item, and a warning names it; a call that leaves it alone says nothing."""
    model = Containers()
    model.hist.extend(range(containers.CONTENTS_LIMIT + 1))
    with pytest.warns(UserWarning, match=r"'hist' \(a list of 1026 items\)"):
        with salience.model_guard(model):
            model(torch.ones(2))
    assert len(model.hist) == containers.CONTENTS_LIMIT + 2 and model.stats == {} and model.tags == set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with salience.model_guard(model):
            pass


def test_a_forward_log_is_left_as_the_passes_left_it():
    """(a) The tests' :class:`ForwardLog` (a list subclass) is not put back: the count of the passes stays."""
    model = _Net(Containers()).eval()
    model.pre.hist = ForwardLog()
    salience.vanilla(model, _x(), 1)
    assert model.pre.hist == [0] and model.pre.stats == {} and model.pre.tags == set()


def test_guard_leaves_torch_nn_layers_alone():
    """(a) A torch.nn layer's containers are not copied (its forward fills none): the record of a hooked Linear has
    no contents, and a user module's has one per container."""
    lin = nn.Linear(2, 2)
    lin.register_forward_hook(lambda *a: None)
    lin.extra = [1]
    state = guard.ModuleState(lin, None)
    assert state.attrs is not None and state.contents == ()
    assert sorted(k for k, _, _ in guard.ModuleState(Containers(), None).contents) == ["hist", "stats", "tags"]


class InferenceSeen(nn.Module):
    """An inference-tensor attribute ``seen`` (made under torch.inference_mode), set to 1 in place by each forward
    under inference mode (the only mode where it can be written), 0 before."""

    def __init__(self) -> None:
        super().__init__()
        with torch.inference_mode():
            self.seen = torch.zeros(())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h * (1 + self.seen.clone())
        with torch.inference_mode():
            self.seen.fill_(1.0)
        return out


@pytest.mark.parametrize("run", [False, True])
def test_guard_puts_back_an_inference_tensor_attribute(run):
    """(b) On 9707fe5 ``seen`` (no version counter) stayed 1 after the call, and the second call's map doubled."""
    model, x = _Net(InferenceSeen()).eval(), _x()
    seen = model.pre.seen
    ref = _vanilla_by_hand(_Net(InferenceSeen()).eval(), x, 1)
    def between() -> None:
        assert float(model.pre.seen) == 0.0, "the run's baseline put back after the call"

    first, second = _two_calls(model, x, run, between)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
    assert model.pre.seen is seen and float(seen) == 0.0 and seen.is_inference()


class Block(nn.Module):
    """Counts its calls, keeps a history list and writes a plain tensor attribute in place: all on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.calls = 0
        self.hist: list = []
        self.seen = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.hist.append(1)
        self.seen.fill_(1.0)
        self.last = x
        return self.bn(self.lin(x))


def _direct_forward_model() -> nn.Module:
    """A model whose forward reaches ``block`` through a closure and calls ``block.forward(x)`` directly (not
    ``block(x)``: fx's patched ``nn.Module.__call__`` never sees it), and also a bound ``forward`` taken before."""
    block, other = Block(), Block()
    bound = other.forward

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.other = block, other

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return bound(run(x))

    def run(x: torch.Tensor) -> torch.Tensor:
        return block.forward(x)

    return Outer().eval()


def _block_state(b: Block) -> tuple:
    return b.calls, list(b.hist), float(b.seen), "last" in b.__dict__


def test_trace_of_a_direct_forward_call_writes_nothing_of_the_model():
    """(c) On 9707fe5 the trace ran ``block.forward`` on the model: its count, list, tensor and ``last`` (an fx
    proxy) were the model's after. Now nothing of the model changes, and the trace is the model's function."""
    model = _direct_forward_model()
    before = {id(m): m.__dict__.copy() for m in model.modules()}
    traced = folding.fx_traced(model, None)
    assert isinstance(traced, torch.fx.GraphModule), traced
    for b in (model.block, model.other):
        assert _block_state(b) == (0, [], 0.0, False)
    for m in model.modules():
        assert m.__dict__ == before[id(m)]
    x = torch.rand(4, 3)
    with torch.no_grad():
        expect = model.other.bn(model.other.lin(model.block.bn(model.block.lin(x))))
        torch.testing.assert_close(traced(x), expect)


def test_fold_of_a_direct_forward_call_writes_nothing_of_the_model():
    """(c) The same through the folded copy (``fold_batchnorm``'s ``_fold``, which traces a copy of the model: the
    copy's modules are then the GraphModule's), and the model's own attributes are untouched."""
    model = _direct_forward_model()
    folded = folding._fold(model)
    assert not isinstance(folded, str), folded
    for b in (model.block, model.other):
        assert _block_state(b) == (0, [], 0.0, False)
    x = torch.rand(4, 3)
    with torch.no_grad():
        expect = model.other.bn(model.other.lin(model.block.bn(model.block.lin(x))))
        torch.testing.assert_close(folded(x), expect)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in folded.modules()) == 0  # both folded into their Linear


def test_put_back_state_refuses_a_record_without_the_modules_own_dicts():
    """(d) The fx trace's record (``own_dicts=False``) is for ``state_changes`` only: putting it back is refused; one
    with the dicts is put back as before."""
    m = Containers()
    record = guard.record_state([m], containers=True, own_dicts=False, tensor_copies=False)
    m.hist.append(1)
    assert guard.state_changes(record) == [(0, "hist")]
    with pytest.raises(ValueError, match="own_dicts=True"):
        guard.put_back_state(record)
    record = guard.record_state([m], containers=True)
    m.stats["k"] = 1
    guard.put_back_state(record)
    assert _state(m) == ([1], {}, set())
