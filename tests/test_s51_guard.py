"""Session 51 (guard): the model comes back exactly as it was, and each pass of a many-pass method starts from the state
the call found: the gaps session 50 left.

- A TorchScript module's attributes (``self.calls += 1`` on an int, a float scale replaced, a tensor attribute written
  in place or replaced, a list appended to) stayed after every gradient method's call: the model guard put back only
  its buffers (``guard.Found``, session 50, served the perturbation methods only). Every method of ``salience.METHODS``.
- Ablation-CAM's split clean pass (``methods.scorecam._own_state``) did not record the parameters and submodules by
  name: a forward that sets ``self.w = nn.Parameter(...)`` or swaps its head ran the stopped pass on the first pass's
  writes; and a model with a TorchScript submodule raised a raw AttributeError there.
"""
import copy
import warnings
from typing import List

import numpy as np
import pytest
import torch
from torch import nn

import salience

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

CHEAP = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 2}, "rise": {"masks": 4, "cell": 2}}


class Block(nn.Module):
    """A block whose forward keeps state of every kind TorchScript holds: a buffer and a plain tensor written in place,
    an int counter, a float replaced, a tensor attribute replaced, a list appended to; each read by the next call."""

    def __init__(self, big: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("count", torch.zeros(()))
        self.calls = 0
        self.scale = 1.0
        self.seen = torch.zeros(big)
        self.last = torch.zeros(4)
        self.log = torch.jit.Attribute([], List[int])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)) * self.scale + 0.01 * self.calls + 0.1 * self.last.view(1, 4, 1, 1)
        self.count += 1
        self.calls += 1
        self.scale = self.scale * 1.5
        self.seen.add_(1.0)
        self.last = y.detach().mean((0, 2, 3))
        self.log.append(self.calls)
        return y


class Net(nn.Module):
    """A Python model around a scripted block (the CAMs hook the Python ``stem``)."""

    def __init__(self, big: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = torch.jit.script(Block(big))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def _scripted_state(b) -> tuple:
    """The scripted block's state: values, and the tensor attributes' identities."""
    return b.count.clone(), b.calls, b.scale, b.seen.clone(), b.last, b.last.clone(), list(b.log)


def _same_scripted(b, was: tuple) -> None:
    count, calls, scale, seen, last, last_values, log = was
    assert torch.equal(b.count, count) and b.calls == calls and b.scale == scale and list(b.log) == log
    assert torch.equal(b.seen, seen), "a plain tensor attribute written in place stayed"
    assert b.last is last and torch.equal(b.last, last_values), "a replaced tensor attribute stayed"


def _net(big: int = 4) -> Net:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Net(big).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 8, 8))  # the user's own call: a state of their own
    return m


@pytest.mark.parametrize("method", sorted(salience.METHODS))
def test_a_scripted_modules_state_comes_back_after_every_method(method):
    """After each method (a refusal of TorchScript too), the scripted block's state is the user's, and every weight,
    buffer and attribute of the Python part equals a deep copy taken before."""
    m = _net()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    was, weights = _scripted_state(m.block), copy.deepcopy(m.state_dict())
    kw = dict(CHEAP.get(method, {}))
    if method in salience.methods.LAYER_METHODS:
        kw["layer"] = "stem"
    try:
        salience.METHODS[method](m, x, 1, **kw)
    except salience.SalienceError as e:  # the methods that refuse TorchScript (or a CNN): before any pass
        assert "TorchScript" in str(e) or method in salience.methods.ATTENTION_METHODS
    _same_scripted(m.block, was)
    now = m.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())
    assert not m.training and not m.block.training


def test_a_whole_scripted_model_comes_back_after_vanilla_and_input_x_gradient():
    """The model itself scripted (no Python part): its counters after the gradient methods."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block()).eval())
    x = torch.randn(1, 3, 8, 8)
    for method in ("vanilla", "input_x_gradient"):
        was = _scripted_state(m[1])
        salience.METHODS[method](_Pooled(m), x, 1)
        _same_scripted(m[1], was)


class _Pooled(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).mean((2, 3))


def test_a_large_scripted_tensor_written_in_place_is_put_back():
    """A plain tensor attribute of a scripted module over the guard's 1 MiB copy limit, written in place by the
    forward: put back from the copy kept across calls, no warning (session 53; until then it stayed written, told by a
    warning; before session 51 silently)."""
    m = _net(big=300_000)  # 1.2 MiB
    x = torch.randn(1, 3, 8, 8)
    seen = m.block.seen.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the second call from the kept copy
            salience.vanilla(m, x, 1)
            assert torch.equal(m.block.seen, seen)
    assert m.block.calls == 1 and m.block.scale == 1.5  # the rest put back


class Seen(list):
    """A log of what each forward saw (a subclass of list: not copied nor put back by salience)."""


class Swapping(nn.Module):
    """Ablation-CAM at its first conv (the split's two clean passes): the forward sets ``self.w`` to a new parameter
    and swaps its head for a new layer each call; it logs the value of ``w`` and the head it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.w = nn.Parameter(torch.tensor(1.0))
        self.seen = Seen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((float(self.w), id(self.head)))
        z = torch.relu(self.conv2(torch.relu(self.conv1(x)) * self.w)).mean((2, 3))
        out = self.head(z)
        self.w = nn.Parameter(self.w.detach() * 2)
        head = nn.Linear(8, 4)
        head.load_state_dict({k: v * 3 for k, v in self.head.state_dict().items()})
        self.head = head
        return out


def test_ablationcams_split_passes_see_the_parameters_and_head_found():
    """Each of Ablation-CAM's passes (the split's stopped pass too) sees the ``w`` and head the call found, and the
    model comes back with them; before, the stopped pass ran on the first pass's ``w`` (2.0) and head."""
    torch.manual_seed(0)
    m = Swapping().eval()
    x = torch.randn(2, 3, 16, 16)
    w, head = m.w, m.head
    weights = copy.deepcopy(m.state_dict())
    salience.ablationcam(m, x, 1, layer="conv1")
    assert m.seen and set(m.seen) == {(1.0, id(head))}, sorted(set(m.seen))
    assert m.w is w and m.head is head
    now = m.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())


def test_ablationcams_split_record_tells_a_parameter_replaced():
    """``_own_state``'s record (the split's) tells a parameter or a submodule replaced in a forward, by name, and puts
    them back (``guard.state_changes`` / ``put_back_state``)."""
    from salience._core.guard import put_back_state, state_changes
    from salience.methods.scorecam import _own_state

    torch.manual_seed(0)
    m = Swapping().eval()
    w, head = m.w, m.head
    record = _own_state(m)
    assert state_changes(record) == []
    with torch.no_grad():
        m(torch.randn(1, 3, 8, 8))
    assert sorted(k for _, k in state_changes(record)) == ["head", "w"]
    put_back_state(record)
    assert m.w is w and m.head is head and state_changes(record) == []


class Table(nn.Module):
    """A model with a plain tensor attribute over the guard's 1 MiB copy limit (a lookup table): its forward reads it
    and, where ``self.write`` is set, writes it in place; each forward logs the table's first value it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.table = torch.arange(300_000, dtype=torch.float32)  # 1.1 MiB
        self.write = False
        self.seen = Seen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(self.table[1]))
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3)) * float(self.table[1]))
        if self.write:
            self.table.add_(1.0)
        return out


def _kept_copy(m: Table):
    from salience._core.guard import values as guard

    entry = guard.KEPT.get(id(m.table))
    return None if entry is None else entry[3]


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", "occlusion"])
def test_a_large_table_is_copied_once_not_once_a_call(method):
    """``Found`` copied every plain tensor attribute whatever its size once a call (a 100 MiB table: 50 ms and
    100 MiB a call of SmoothGrad). The copy is kept while the table holds the values it copied: the second call takes
    none; a call whose passes write the table still has each pass see the values found, and the table comes back; the
    user's own write between calls gives the next call's passes the new values (a new copy)."""
    torch.manual_seed(0)
    m = Table().eval()
    x = torch.randn(1, 3, 8, 8)
    kw = {"smoothgrad": {"samples": 3}, "integrated_gradients": {"steps": 3}, "occlusion": {"window": 4}}[method]
    kw["chunk"] = 1  # a pass per sample, step or window
    run = salience.METHODS[method]
    first = run(m, x, 1, **kw)
    kept = _kept_copy(m)
    assert kept is not None and torch.equal(kept, m.table)
    m.seen.clear()
    assert torch.equal(run(m, x, 1, **kw), first)
    assert _kept_copy(m) is kept and set(m.seen) == {1.0}
    m.write, table = True, m.table.clone()  # each pass writes it: each still sees the values found, put back
    m.seen.clear()
    assert torch.equal(run(m, x, 1, **kw), first)
    assert set(m.seen) == {1.0} and len(m.seen) > 2 and torch.equal(m.table, table) and _kept_copy(m) is kept
    m.write = False
    with torch.no_grad():
        m.table.mul_(2)  # the user's write between calls
    m.seen.clear()
    run(m, x, 1, **kw)
    assert set(m.seen) == {2.0} and torch.equal(_kept_copy(m), m.table)


def test_a_kept_copy_goes_with_its_table():
    """The kept copy is dropped with the tensor it copies (a weak reference): no memory held for a model gone."""
    import gc

    from salience._core.guard import values as guard

    torch.manual_seed(0)
    m = Table().eval()
    salience.smoothgrad(m, torch.randn(1, 3, 8, 8), 1, samples=2)
    key = id(m.table)
    assert key in guard.KEPT
    del m
    gc.collect()
    assert key not in guard.KEPT


class Held(nn.Module):
    """A forward that writes in place tensors held in containers (a list, a dict, a list inside a dict) and a NumPy
    array (``self.hist[0] += 1``), each read by the next call; it logs what it read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.cache = [torch.zeros(4), 5]
        self.named = {"a": torch.zeros(4)}
        self.nest = {"x": [torch.zeros(2)]}
        self.hist = np.zeros(4)
        self.seen = Seen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = (float(self.cache[0][0]), float(self.named["a"][1]), float(self.nest["x"][0][0]), float(self.hist[0]))
        self.seen.append(read)
        y = self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)) + sum(read))
        self.cache[0].add_(1)
        self.named["a"].add_(1)
        self.nest["x"][0].add_(1)
        self.hist[0] += 1
        return y


def _held_state(m: Held) -> tuple:
    return m.cache[0], m.named["a"], m.nest["x"][0], m.hist


@pytest.mark.parametrize("method", ["vanilla", "gradcam", "smoothgrad", "integrated_gradients", "occlusion", "rise",
                                    "ablationcam"])
def test_tensors_in_containers_and_arrays_come_back_and_each_pass_sees_them_as_found(method):
    """Tensors inside a list, a dict and a list in a dict, and a NumPy array, written in place by the forward: the
    container's copy held the same objects and the array had no record, so the writes stayed after the call and each
    pass of a many-pass method saw the last pass's. Now each pass reads the values found (the log) and the model comes
    back with the same objects holding the same values (a deep copy taken before)."""
    torch.manual_seed(0)
    m = Held().eval()
    x = torch.randn(2, 3, 8, 8)
    objects, was = _held_state(m), copy.deepcopy(_held_state(m))
    kw = dict(CHEAP.get(method, {}), **({"chunk": 1} if method in ("smoothgrad", "integrated_gradients") else {}))
    if method in salience.methods.LAYER_METHODS:
        kw["layer"] = "conv1"
    salience.METHODS[method](m, x, 1, **kw)
    assert set(m.seen) == {(0.0, 0.0, 0.0, 0.0)}, sorted(set(m.seen))
    now = _held_state(m)
    assert all(a is b for a, b in zip(now, objects)) and m.cache[1] == 5
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(now, was))


class Swapped(nn.Module):
    """A forward that swaps the storage under a buffer and a plain tensor attribute (``.data = t``, which moves no
    version counter, or ``.set_(t)``); each logs what it read."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("buf", torch.zeros(4))
        self.t = torch.zeros(4)
        self.how = how
        self.seen = Seen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = (float(self.buf[0]), float(self.t[0]))
        self.seen.append(read)
        y = self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)) + sum(read))
        with torch.no_grad():
            for v in (self.buf, self.t):
                if self.how == "data":
                    v.data = v + 1
                else:
                    v.set_(torch.cat([v + 1, v]))
        return y


@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "occlusion", "ablationcam"])
def test_a_storage_swapped_under_a_tensor_comes_back(method, how):
    """``self.buf.data = t`` kept the buffer object and its version (its new values stayed, silently); ``.set_(t)``
    got its values back (a larger size failed) but not its storage: a view the user holds of it no longer followed it.
    Now each pass reads the values found, and the buffer and the attribute come back on their own storage (a view
    taken before follows them)."""
    torch.manual_seed(0)
    m = Swapped(how).eval()
    views = (m.buf[:2], m.t[:2])
    kw = dict(CHEAP.get(method, {}), **({"chunk": 1} if method == "smoothgrad" else {}))
    if method in salience.methods.LAYER_METHODS:
        kw["layer"] = "conv1"
    salience.METHODS[method](m, torch.randn(2, 3, 8, 8), 1, **kw)
    assert set(m.seen) == {(0.0, 0.0)}, sorted(set(m.seen))
    for v, view in zip((m.buf, m.t), views):
        assert v.shape == (4,) and torch.equal(v, torch.zeros(4))
        assert v.data_ptr() == view.data_ptr() and v.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
