"""Session 47, salience's fixed cost per call (docs/performance.md, "Session 47: salience's fixed cost per call").

Three per-call walks were made cheaper without changing what they return: ``fingerprint.structure`` (and
``_fold_key``) walk the modules from one stack instead of ``model.modules()``'s generator (which builds every module's
dotted name), ``engine.weight_bytes`` sums the parameters of the guard's quick walk with a dense tensor's bytes read
first, and the guard's check for a BatchNorm without running statistics reads the buffer from the module's dict (not
through ``nn.Module.__getattr__``). No cache across calls was added: every call still walks the model as it is then.

The tests: (1) each walk equals a reference written from the old definition (``model.modules()``,
``model.parameters()``, ``m.running_mean``) on models built to take every branch; (2) a model changed between two
calls (a module added, removed, replaced, its class swapped, an instance ``forward``, a hook added or removed, a
parameter swapped, a buffer changed in place, a ``train()`` flip) is seen changed by the fingerprints, and the second
call's maps equal those of a fresh copy of the changed model (nothing of the first call is reused), the model coming
back exactly, also after an exception; the same checks run against a deliberately wrong fingerprint (one cached per
model across calls) fail, so they can tell; (3) the walks no longer call the generators (fails on main's code).
"""
from __future__ import annotations

import copy
import threading
import weakref

import pytest
import torch
from torch import nn

import salience
from salience._core import engine, fingerprint, guard, perf
from salience._core.fingerprint import _fold_key, structure

# ----------------------------------------------------------------------------------------------- references


def _reference_structure(model: nn.Module, tensors: bool = False) -> tuple:
    """The fingerprint by its definition before session 47: ``model.modules()``'s order, each module's id, class,
    children's names and instance ``forward`` (this thread's), then its own hooks' keys per hook dict (observers and
    other threads' left out) where any, then with ``tensors`` each parameter's and buffer's address, version, shape
    and strides. Since session 48 a module and an instance ``forward`` by their id and a weak reference."""
    out: list = []
    me = threading.get_ident()
    for m in model.modules():
        d = m.__dict__
        f = d.get("forward")
        if f is not None and getattr(f, "salience_thread", me) != me:
            f = None
        forward = None if f is None else (id(f), weakref.ref(f))
        out.append((id(m), weakref.ref(m), type(m), tuple(m._modules.keys()), forward))
        own = tuple(tuple(k for k, h in (d.get(name) or {}).items()
                          if not getattr(h, "salience_observer", False) and getattr(h, "salience_thread", me) == me)
                    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        if any(own):
            out.append(own)
        if tensors:
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    out.append((t.data_ptr(), t._version, t.shape, t.stride()))
    # review of session 47 (tests/test_s47_rvfixed.py): where the modules are no plain tree, each module's slots' ids
    slots = [m._modules for m in model.modules()]
    if sum(len(s) for s in slots) != len(slots) - 1:
        out.append(tuple(tuple(id(c) for c in s.values()) for s in slots))
    return tuple(out)


def _reference_weight_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        if p.layout == torch.sparse_coo:
            total += sum(q.numel() * q.element_size() for q in (p._values(), p._indices()))
        else:
            total += p.numel() * p.element_size()
    return total


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_module("gap", None)  # a None child: skipped by modules()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _Block()
        self.shared = nn.Conv2d(4, 4, 1)
        self.b = nn.Sequential(self.shared, nn.ReLU(), self.shared)  # a module reached twice: once in modules()
        self.head = nn.Linear(4, 5)
        self.tied = self.head  # the same module under two names

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean((2, 3)))


class _OwnModules(_Net):
    """A class that lists its modules itself: the generator's answer is taken as it is."""

    def modules(self):
        return iter([self, self.head])


class _OwnNamedModules(nn.Sequential):
    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield from super().named_modules(memo, prefix, remove_duplicate)


def _hooked(model: nn.Module) -> nn.Module:
    model.a.conv.register_forward_hook(lambda m, i, o: None)
    model.head.register_forward_pre_hook(lambda m, i: None)
    model.b[1].register_full_backward_hook(lambda m, gi, go: None)
    obs = fingerprint.observer(lambda m, i, o: None)
    model.a.bn.register_forward_hook(obs)  # an observer alone: as without it
    other = lambda m, i, o: None  # noqa: E731
    other.salience_thread = -1  # another thread's (this_thread's marker)
    model.shared.register_forward_hook(other)
    model.a.relu.forward = lambda x: torch.relu(x)  # an instance forward
    return model


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [_Net(), _hooked(_Net()), _OwnModules(), nn.Sequential(_OwnNamedModules(nn.ReLU()), nn.Linear(2, 2)),
            nn.Linear(3, 2), nn.Sequential()]


@pytest.mark.parametrize("i", range(6))
def test_structure_and_fold_key_equal_their_definition(i):
    """Every branch (None children, a module reached twice, hooks of each kind, observers, another thread's hook, an
    instance forward, classes that list modules themselves, no children at all): the same tuple as before."""
    model = _models()[i]
    assert structure(model) == _reference_structure(model)
    assert _fold_key(model) == _reference_structure(model, tensors=True)


def test_weight_bytes_equals_the_sum_over_parameters():
    """Tied parameters once, a sparse parameter by what it holds, a class that lists its parameters itself."""
    torch.manual_seed(0)
    net = _Net()
    assert engine.weight_bytes(net) == _reference_weight_bytes(net) == sum(
        p.numel() * 4 for p in {id(p): p for p in net.parameters()}.values())
    sparse = nn.Module()
    sparse.w = nn.Parameter(torch.eye(100).to_sparse())
    sparse.d = nn.Parameter(torch.zeros(3, 3, dtype=torch.float16))
    assert engine.weight_bytes(sparse) == _reference_weight_bytes(sparse) == 100 * 4 + 2 * 100 * 8 + 9 * 2

    class OwnParameters(_Net):
        def parameters(self, recurse=True):
            return iter([self.head.weight])

    own = OwnParameters()
    assert engine.weight_bytes(own) == _reference_weight_bytes(own) == 4 * 5 * 4


# ----------------------------------------------------------------------- a model that changes between calls


def _changes():
    """(name, change(model)) : each a change of the model between two calls."""
    def add(m):
        m.extra = nn.Identity()

    def remove(m):
        del m.a.relu
        m.a.relu = nn.Identity()  # the forward still runs: a module replaced under the same name by another class

    def replace(m):
        m.head = nn.Linear(4, 5)

    def swap_class(m):
        class Relu6(nn.ReLU):
            def forward(self, x):
                return torch.clamp(x, 0, 0.1)
        m.a.relu.__class__ = Relu6

    def instance_forward(m):
        m.a.relu.forward = lambda x: torch.clamp(x, 0, 0.1)

    def hook_added(m):
        m.head.register_forward_hook(lambda mod, i, o: o * 2)

    def swap_param(m):
        m.head.weight = nn.Parameter(torch.randn(5, 4))

    def buffer_in_place(m):
        with torch.no_grad():
            m.a.bn.running_mean.add_(0.5)

    def train_flip(m):
        m.train()

    return [("add", add), ("remove", remove), ("replace", replace), ("swap_class", swap_class),
            ("instance_forward", instance_forward), ("hook_added", hook_added), ("swap_param", swap_param),
            ("buffer_in_place", buffer_in_place), ("train_flip", train_flip)]


def _seen_changed(change, structure_fn=structure, fold_fn=_fold_key) -> bool:
    """Whether a change is seen by what keys salience's per-model caches (the structure, the folded copy's key) or
    by the mode the guard records."""
    torch.manual_seed(0)
    net = _Net().eval()
    before, fold_before = structure_fn(net), fold_fn(net)
    change(net)
    return structure_fn(net) != before or fold_fn(net) != fold_before or net.training


@pytest.mark.parametrize("name,change", _changes())
def test_a_change_between_calls_is_seen(name, change):
    assert _seen_changed(change)


def test_a_hook_removed_between_calls_is_seen():
    torch.manual_seed(0)
    net = _Net().eval()
    h = net.head.register_forward_hook(lambda mod, i, o: o * 2)
    before = structure(net)
    h.remove()  # no counter moves: only the walk sees it
    assert structure(net) != before


def _cached(fn):
    """A deliberately wrong fingerprint: ``fn``'s answer kept per model across calls (a cache without a check)."""
    memo: dict = {}

    def cached(model):
        return memo.setdefault(id(model), fn(model))
    return cached


@pytest.mark.parametrize("name,change", [c for c in _changes() if c[0] != "train_flip"])
def test_the_check_fails_on_fingerprints_cached_across_calls(name, change):
    """The same check with both fingerprints kept per model across calls: no change is seen (so the test above can
    fail). The mode flip is the guard's to record and put back (``test_second_call_after_a_change_is_a_fresh_models``)."""
    assert not _seen_changed(change, _cached(structure), _cached(_fold_key))


def _sg(model, x, target):
    return salience.smoothgrad(model, x, target, samples=4, seed=3, reduce=None)


def _state(model: nn.Module) -> tuple:
    return (_reference_structure(model, tensors=True), [m.training for m in model.modules()],
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _same_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[3].keys() == b[3].keys() and \
        all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize("name,change", _changes())
def test_second_call_after_a_change_is_a_fresh_models(name, change):
    """Two calls on one model with a change in between: the second call's maps are, bit for bit, those of a fresh
    copy of the changed model in a fresh cache (nothing the first call found is reused for the changed model), and
    the model comes back exactly as the user left it after each call."""
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2])
    for _ in range(2):  # warm: the per-model caches filled
        _sg(net, x, target)
    change(net)
    if name == "train_flip":
        assert net.training
    mine = copy.deepcopy(net)
    state = _state(net)
    got = _sg(net, x, target)
    assert _same_state(_state(net), state)
    perf.clear_cache()
    want = _sg(mine, x, target)
    assert torch.equal(got, want)


def test_model_comes_back_after_an_exception_in_the_pass():
    """A forward that fails on the second call (a flag the user set between calls) leaves the model as it was."""
    torch.manual_seed(0)
    net = _Net().train()
    x = torch.rand(1, 3, 8, 8)
    target = torch.tensor([1])
    _sg(net, x, target)
    net.b[1].forward = lambda t: (_ for _ in ()).throw(RuntimeError("boom"))
    state = _state(net)
    with pytest.raises(RuntimeError, match="boom"):
        _sg(net, x, target)
    assert _same_state(_state(net), state)
    assert net.training


# ------------------------------------------------------------------------------- the generators are not walked


class _Count:
    def __init__(self, monkeypatch, name: str) -> None:
        self.n = 0
        orig = getattr(nn.Module, name)

        def counted(module, *a, **k):
            self.n += 1
            return orig(module, *a, **k)
        monkeypatch.setattr(nn.Module, name, counted)


def test_structure_walks_no_generator(monkeypatch):
    """On a model whose classes list modules as nn.Module does, the fingerprints walk one stack (main's code: one
    ``named_modules`` generator per module)."""
    net = _hooked(_Net())
    count = _Count(monkeypatch, "named_modules")
    structure(net)
    _fold_key(net)
    assert count.n == 0


def test_weight_bytes_walks_no_generator(monkeypatch):
    net = _Net()
    count = _Count(monkeypatch, "named_parameters")
    engine.weight_bytes(net)
    assert count.n == 0


def test_batchnorm_check_reads_the_buffer(monkeypatch):
    """The guard's check for a BatchNorm without running statistics reads the buffer from the module's dict (main's
    code: ``m.running_mean`` through nn.Module.__getattr__, once per layer and call); it still refuses a pass of
    several images through one, and a subclass whose ``running_mean`` is a property is read as the attribute."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 2)).eval()
    asked: list = []
    orig = nn.Module.__getattr__

    def spy(module, name):
        if name == "running_mean":
            asked.append(module)
        return orig(module, name)
    monkeypatch.setattr(nn.Module, "__getattr__", spy)
    with guard.model_guard(net):
        pass
    assert asked == []
    monkeypatch.setattr(nn.Module, "__getattr__", orig)
    with pytest.raises(salience.SalienceError, match="no running statistics"):
        salience.smoothgrad(net, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), samples=2, chunk=4)

    class NoStats(nn.BatchNorm2d):
        """Its running mean a property of the class (None), not a buffer."""

        @property
        def running_mean(self):
            if not self.__dict__.get("built"):
                raise AttributeError("running_mean")  # while nn.BatchNorm2d.__init__ registers the buffer
            return None

    odd = NoStats(3, track_running_stats=False).eval()
    del odd._buffers["running_mean"]
    odd.__dict__["built"] = True
    with guard.model_guard(odd):
        with pytest.raises(salience.SalienceError, match="no running statistics"):
            odd(torch.rand(2, 3, 4, 4))
