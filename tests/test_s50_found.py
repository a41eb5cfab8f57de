"""Session 50: the state record's cost and reach (``guard.Found`` and the record it shares with the model guard).

- TorchScript modules (``torch.jit.script`` / ``trace``) keep their state in TorchScript's attributes, which ``Found``
  skipped: each perturbation pass saw the writes of the pass before, and the call left the counters and replaced
  tensors as the last pass wrote them (the model guard puts back their buffers only). Checked against Zeiler &
  Fergus's occlusion written out with the state reset before every forward.
- A container inside a container (a deque in a dict: ``self.state["recent"].append(y)``) was not copied (one level):
  its changes stayed, between the passes and after the call. Now one level more, within the guard's 1024 items.
- ``Found.before_pass`` tells a change from whole lists compared in C (session 50's cut): each kind of change it must
  still see, one by one, the state put back exactly as recorded.
"""
import warnings
from collections import Counter, OrderedDict, defaultdict, deque
from typing import List

import pytest
import torch
from torch import nn

import salience
from salience._core.guard import Found, model_guard
from test_s49_occlusion_state import SIZE, _occlusion_reference as occlusion_reference

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                                        "ignore:`torch.jit.trace` is deprecated:FutureWarning")


def _occlusion_reference(m, x, target, win, st, reset):
    """Zeiler & Fergus's occlusion written out (tests/test_s49_occlusion_state.py's), ``reset()`` before every
    forward."""
    class Reset:
        def set_state(self, _):
            reset()

        def __call__(self, xx):
            return m(xx)

    return occlusion_reference(Reset(), x, target, win, st, None)


class Scripted(nn.Module):
    """A scripted forward that writes a buffer in place, counts its calls (an int), replaces a tensor attribute and
    appends to a list: each read by the next call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("acc", torch.zeros(8))
        self.calls = 0
        self.scale = torch.ones(8)
        self.seen = torch.jit.Attribute([], List[float])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x)).mean((2, 3))
        z = z * self.scale + self.acc + 0.25 * self.calls + 0.1 * float(len(self.seen))
        self.acc += z.mean(0)
        self.calls += 1
        self.scale = self.scale * 1.5
        self.seen.append(float(self.calls))
        return self.fc(z)


def _scripted():
    torch.manual_seed(0)
    m = torch.jit.script(Scripted().eval())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        m(torch.randn(2, 3, SIZE, SIZE))  # the user's own call: a state of their own
    acc, calls, scale, seen = m.acc.clone(), m.calls, m.scale, list(m.seen)

    def reset():
        with torch.no_grad():
            m.acc.copy_(acc)
        m.calls, m.scale, m.seen = calls, scale, list(seen)

    def same():
        assert torch.equal(m.acc, acc) and m.calls == calls and m.scale is scale and list(m.seen) == seen

    return m, x, reset, same


@pytest.mark.parametrize("chunk", [None, 5])
def test_scripted_state_put_back_before_each_pass(chunk):
    m, x, reset, same = _scripted()
    target = torch.tensor([1, 2])
    want = _occlusion_reference(m, x, target, 4, 4, reset)
    reset()
    got = salience.occlusion(m, x, target, window=4, stride=4, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    same()  # the call's end put it back too (the model guard put back the buffer only)


def test_scripted_state_rise():
    """RISE (Petsiuk et al.): sum_i S(x * M_i) M_i / (N p), each masked forward from the state the call found."""
    from salience.methods.perturbation import rise_masks

    m, x, reset, same = _scripted()
    target = torch.tensor([0, 3])
    rows = torch.arange(len(x))
    n, p = 6, 0.5
    want = torch.zeros(len(x), SIZE, SIZE)
    with torch.no_grad():
        for i in range(n):
            mask = rise_masks(i, i + 1, (SIZE, SIZE), cell=4, p=p, seed=3)[0]
            reset()
            want += m(x * mask).softmax(1)[rows, target][:, None, None] * mask
    reset()
    got = salience.rise(m, x, target, masks=n, cell=4, p=p, seed=3, chunk=2)
    torch.testing.assert_close(got, want / (n * p), rtol=1e-5, atol=1e-6)
    same()


class Traced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("acc", torch.zeros(8))

    def forward(self, x):
        z = torch.relu(self.conv(x)).mean((2, 3)) + self.acc
        self.acc.add_(z.detach().mean(0))
        return self.fc(z)


def test_traced_buffer_put_back_before_each_pass():
    """A traced forward (``torch.jit.trace``) that writes a buffer in place: each pass from the buffer found."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.trace(Traced().eval(), x[:1], check_trace=False)
    acc = m.acc.clone()

    def reset():
        with torch.no_grad():
            m.acc.copy_(acc)

    target = torch.tensor([2, 1])
    want = _occlusion_reference(m, x, target, 8, 4, reset)
    reset()
    got = salience.occlusion(m, x, target, window=8, stride=4, chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.acc, acc)


class Box:
    def __init__(self, n: int) -> None:
        self.n = n


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    Box = torch.jit.script(Box)


class WithObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.box = Box(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.box.n += 1
        return self.fc(x.mean((2, 3)))


def test_scripted_class_object_named_once():
    """An object of a scripted class cannot be copied: a warning names it, once for the module."""
    m = torch.jit.script(WithObject().eval())
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.warns(UserWarning, match="the scripted class object 'box' of the TorchScript module 'WithObject'"):
        salience.occlusion(m, x, torch.tensor([0]), window=8, stride=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        salience.occlusion(m, x, torch.tensor([0]), window=8, stride=8)


class Nested(nn.Module):
    """A running window (a deque) and a list of past scores inside a dict, and a list of lists: read by the next
    call, changed in place one level down."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.state = {"recent": deque([0.0], maxlen=3), "scores": [1.0]}
        self.rows = [[0.5], [0.25]]

    def forward(self, x):
        z = torch.relu(self.conv(x)).mean((2, 3))
        z = z + sum(self.state["recent"]) + 0.1 * len(self.state["scores"]) + sum(self.rows[1])
        self.state["recent"].append(float(z.detach().mean()))
        self.state["scores"].append(1.0)
        self.rows[1].append(0.5)
        return self.fc(z)


def _nested():
    torch.manual_seed(0)
    m = Nested().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        m(torch.randn(2, 3, SIZE, SIZE))
    recent, scores, row = m.state["recent"], m.state["scores"], m.rows[1]
    saved = (list(recent), list(scores), list(row))

    def reset():
        recent.clear()
        recent.extend(saved[0])
        scores[:] = saved[1]
        row[:] = saved[2]

    def same():
        assert m.state["recent"] is recent and list(recent) == saved[0] and recent.maxlen == 3
        assert m.state["scores"] is scores and scores == saved[1] and m.rows[1] is row and row == saved[2]

    return m, x, reset, same


def test_nested_containers_put_back_before_each_pass():
    m, x, reset, same = _nested()
    target = torch.tensor([1, 3])
    want = _occlusion_reference(m, x, target, 4, 4, reset)
    reset()
    got = salience.occlusion(m, x, target, window=4, stride=4, chunk=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    same()


def test_nested_containers_put_back_by_the_model_guard():
    """A gradient method's passes (SmoothGrad's noisy copies) write the nested state; the call puts it back."""
    m, x, _, same = _nested()
    salience.smoothgrad(m, x, torch.tensor([0, 1]), samples=4, seed=0)
    same()


def test_nested_past_the_guards_bound_stays_one_level():
    """The guard copies the containers inside one within the same 1024 items (its cost per call): past them, the
    parent's contents are put back, not the inner one's (as before, one level)."""
    m = Nested().eval()
    m.state["big"] = list(range(2000))
    outer = dict(m.state)
    with model_guard(m):
        m.state["big"].append(-1)
        m.state["recent"].append(9.0)
        m.state["new"] = 1
    assert m.state == outer and m.state["big"][-1] == -1  # the dict itself put back; the big list stays


class Empty(nn.Module):
    """A module of the user's with nn.Module's own attributes only."""


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.inner = nn.Sequential(nn.Linear(2, 2))
        self.plain = Empty()
        self.hist = [1, 2]
        self.cache = OrderedDict(a=1, b=2)
        self.counts = Counter(a=1)
        self.by = defaultdict(list, a=[1])
        self.tags = {1, 2}
        self.t = torch.zeros(3)
        self.register_buffer("buf", torch.zeros(2))
        self.register_buffer("one", torch.zeros(()))


def _changes():
    """Each kind of change a pass may make, one by one (what it does to the model ``m``)."""
    def replace_buffer(m):
        m._buffers["one"] = torch.zeros(())  # equal values, another object

    def rename_buffer(m):
        b = m._buffers.pop("buf")
        m._buffers["renamed"] = b

    return {
        "attribute added": lambda m: setattr(m, "extra", 1),
        "attribute added to a module of nn.Module's keys": lambda m: setattr(m.plain, "extra", 1),
        "attribute deleted": lambda m: delattr(m, "hist"),
        "attribute replaced": lambda m: setattr(m, "hist", [9]),
        "flag flipped": lambda m: setattr(m.plain, "training", True),
        "list appended": lambda m: m.hist.append(3),
        "dict order": lambda m: m.cache.move_to_end("a"),
        "dict value": lambda m: m.cache.__setitem__("a", 5),
        "counter zero key": lambda m: m.counts.__setitem__("z", 0),
        "defaultdict factory": lambda m: setattr(m.by, "default_factory", set),
        "set": lambda m: m.tags.add(3),
        "tensor written": lambda m: m.t.add_(1),
        "buffer written": lambda m: m.buf.add_(1),
        "buffer replaced by an equal one": replace_buffer,
        "buffer renamed": rename_buffer,
        "buffer registered": lambda m: m.plain.register_buffer("b", torch.ones(1)),
        "buffer deleted": lambda m: delattr(m, "one"),
    }


@pytest.mark.parametrize("change", list(_changes()))
def test_each_change_put_back(change):
    m = Stateful().eval()
    with model_guard(m), Found(m) as found:
        dicts = [dict(u.__dict__) for u in m.modules()]
        contents = (list(m.hist), list(m.cache.items()), dict(m.counts), m.by.default_factory, set(m.tags))
        values = [(u, k, b) for u in m.modules() for k, b in u._buffers.items()]
        for _ in range(2):  # twice: the record's versions taken again after the first put-back
            _changes()[change](m)
            found.before_pass()
            assert [u.__dict__ for u in m.modules()] == dicts
            for d, u in zip(dicts, m.modules()):
                assert all(u.__dict__[k] is v for k, v in d.items())
            assert (m.hist, list(m.cache.items()), dict(m.counts), m.by.default_factory, m.tags) == contents
            assert [(u, k, b) for u in m.modules() for k, b in u._buffers.items()] == values
            assert torch.equal(m.t, torch.zeros(3)) and torch.equal(m.buf, torch.zeros(2))


def test_many_modules_only_the_changed_one_put_back():
    """With a change in one of many modules, the others' records are not put back (nor their dicts rewritten)."""
    m = nn.Sequential(*(Stateful() for _ in range(50))).eval()
    with model_guard(m), Found(m) as found:
        m[17].hist.append(3)
        m[31].buf.add_(1)
        assert found._moved() == {i for i, r in enumerate(found.record) if r.module in (m[17], m[31])}
        found.before_pass()
        assert not found._moved()
        assert m[17].hist == [1, 2] and torch.equal(m[31].buf, torch.zeros(2))
