"""Review of session 48's "putback" (eef6d44: the guard copying plain tensor attributes, the split's record, the fx
trace on a shadow of the model). Each test fails on eef6d44:

a) the guard copied every plain tensor attribute of a user module on every call: a 100 MiB lookup table cost each
   ``salience.vanilla`` call about 60 ms and 100 MiB (0.8 ms without; benchmarks/guard-big-attr-s48.txt); now one
   over ``guard._COPY_LIMIT`` is not copied, and a call that writes it in place is told (a warning naming it), after
   everything else was put back;
b) the trace on a shadow refused a model whose forward calls one of its modules other than through its attributes (a
   closure, a global, ``functools.partial``: "module is not installed as a submodule"; a6129eb traced it), and the
   ``partial``'s module ran on the model itself: its counter moved for good. Now such a call is traced as the shadow;
c) the shadow made each module by its class's ``__new__``: fx's GraphModule makes another class there, without the
   forward, so a model that is or holds a GraphModule (``symbolic_trace``, ``create_feature_extractor``) was neither
   traced nor folded (tests/test_s44_occlusion_local.py failed on eef6d44); now ``object.__new__``.
The references: plain autograd on the model, the model's own output, the model's state before the call.
"""
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import salience
from salience._core import folding, guard

_MIB = 2 ** 20


class Table(nn.Module):
    """A plain tensor attribute ``table`` (not a buffer) of ``mib`` MiB, read by the forward; ``write``: the forward
    adds 1 to it in place."""

    def __init__(self, mib: float, write: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.zeros(int(mib * _MIB) // 4)
        self.seen = torch.zeros(())  # a small one: copied and put back as before
        self.write = write
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3)) + self.table[:4] + self.seen
        if self.write:
            self.table.add_(1.0)
            self.seen.fill_(1.0)
        return self.fc(h)


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _input_grad(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    model(x)[:, target].sum().backward()
    return x.grad


def _largest_allocation(fn) -> int:
    """The largest CPU allocation (bytes) of one operator while ``fn`` runs (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_guard_copies_no_large_tensor_attribute_per_call():
    """(a) A 16 MiB plain tensor attribute the forward only reads: no allocation of its size in a call (eef6d44
    cloned it each call), the map the input gradient, no warning."""
    model = Table(16).eval()
    x = _x()
    ref = _input_grad(model, x, 1)
    model.zero_grad(set_to_none=True)
    salience.vanilla(model, x, 1, reduce=None)  # warm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        largest = _largest_allocation(lambda: salience.vanilla(model, x, 1, reduce=None))
        out = salience.vanilla(model, x, 1, reduce=None)
    assert largest < 16 * _MIB, largest
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("run", [False, True])
def test_guard_puts_back_a_large_tensor_attribute_written(run):
    """(a) One the forward writes in place is put back, with the small one beside it (tests/test_s48_putback.py), and no
    warning: from the copy kept across calls (session 53, tests/test_s53_guard.py; here until then it stayed written,
    told by a warning naming it)."""
    model = Table(2, write=True).eval()
    table, x = model.table, _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if run:
            with guard.run_guard(model):
                salience.vanilla(model, x, 1, reduce=None)
        else:
            salience.vanilla(model, x, 1, reduce=None)
    assert model.table is table and torch.equal(table, torch.zeros_like(table))
    assert torch.equal(model.seen, torch.zeros(()))  # the small one put back
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_guard_puts_back_everything_before_a_warning_made_an_error():
    """(a) With warnings as errors the guard's warning raises, after the model was put back (its buffers, its small
    tensor attributes, its parameters' flags, its mode). The warning: a list over 1024 items grown (not copied; since
    session 53 the large tensor is put back, no warning)."""
    model = Table(2, write=True)
    model.register_buffer("count", torch.zeros(()))
    model.log = list(range(2000))
    model.train()

    def forward(x):
        model.count.add_(1)
        model.log.append(x)
        return Table.forward(model, x)
    model.forward = forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="'log'"):
            with salience.model_guard(model):
                model(_x())
    assert "forward" in model.__dict__ and model.__dict__["forward"] is forward
    assert torch.equal(model.count, torch.zeros(())) and torch.equal(model.seen, torch.zeros(()))
    assert model.training and all(p.requires_grad for p in model.parameters())


class Counted(nn.Module):
    """A block that counts its calls and keeps its last input (its forward writes itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last = x
        return self.lin(x)


_GLOBAL = nn.Linear(4, 4)


class Reached(nn.Module):
    """A forward that calls its registered modules through a closure, a global and ``functools.partial``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.g = Counted(), Counted(), _GLOBAL
        a = self.a
        self.through_closure = lambda x: a(x)
        self.through_partial = functools.partial(self.b.forward)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_GLOBAL(self.through_partial(self.through_closure(x))))


def test_trace_reaches_the_models_modules_other_than_by_attribute():
    """(b) Traced (eef6d44: refused, "module is not installed as a submodule"; a6129eb traced it), the graph's output
    the model's, and the model as it was: no counter moved, ``last`` still the reference's input (eef6d44: the
    ``partial``'s counter moved on the model), the writes noted."""
    model = Reached().eval()
    model.norm.running_mean.normal_()
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = model(x)
    state = {id(m): dict(m.__dict__) for m in model.modules()}
    written: set = set()
    traced = folding.fx_traced(model, None, written=written)
    assert not isinstance(traced, str), traced
    for m in model.modules():
        assert m.__dict__ == state[id(m)], type(m).__name__
    assert model.a.calls == 1 and model.b.calls == 1  # the reference's call only
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref)
    names = [n for n, _ in model.named_modules()]
    assert {(names.index("a"), "calls"), (names.index("b"), "calls"), (names.index("a"), "last")} <= written


class _Block(nn.Module):
    """conv -> BatchNorm -> ReLU (a BatchNorm to fold)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _Head(nn.Module):
    """A ``torch.fx.GraphModule`` inside (torchvision's ``create_feature_extractor`` makes one) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.fx.symbolic_trace(_Block().eval())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("which", ["graph module", "inside"])
def test_trace_and_fold_of_a_graph_module(which):
    """(c) A model that is or holds an fx ``GraphModule`` (``symbolic_trace``, ``create_feature_extractor``): eef6d44's
    shadow made each module by its class's ``__new__``, and GraphModule's makes another class, without the forward
    (a6129eb traced and folded it; so did tests/test_s44_occlusion_local.py's folded copy, which failed). Traced and
    folded, the outputs the model's."""
    model = (torch.fx.symbolic_trace(_Block().eval()) if which == "graph module" else _Head()).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
    traced = folding.fx_traced(model, None)
    assert not isinstance(traced, str), traced
    folded = folding._fold(model)
    assert not isinstance(folded, str), folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
