"""Session 52: the model comes back as it was, part 5 (``guard._array_record``, ``guard._kept_values``, ``guard._keep``).

- A NumPy array attribute over 1 MiB (and an inference tensor over 1 MiB) written in place by a forward stayed as
  written, silently: now put back from a copy kept across calls (compared whole at each call: no version counter).
- The tensors in a tuple (or namedtuple) attribute were not looked at (``self.pair[0].add_(1)`` stayed), nor a list
  inside one: now looked into as a list's items.
- A ``numpy.memmap`` attribute written in place (its file written) was not looked at: told now (a warning naming it);
  an object array's items replaced: put back (up to 1024 items), told over.
- Past the kept copies' cap (1 GiB) no copy was kept any more (each call copied anew): the least recently used are
  dropped now to make room.
"""
import collections
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience._core.guard import values as guard

N = 300_000  # float32: 1.1 MiB, over the guard's 1 MiB copy limit


class Writes(nn.Module):
    """A forward that logs ``self.big[0]`` and then writes ``self.big`` (``kind``: a NumPy array, an inference tensor)
    in place; ``fail``: raises after the write."""

    def __init__(self, kind: str = "array", fail: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.kind, self.fail, self.seen = kind, fail, collections.UserList()
        if kind == "array":
            self.big = np.arange(N, dtype=np.float32)
        else:
            with torch.inference_mode():
                self.big = torch.arange(N, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(self.big[0]))
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3))) * (1.0 + float(self.big[0]))
        if self.kind == "array":
            self.big += 1.0
        else:
            with torch.inference_mode():
                self.big.add_(1.0)
        if self.fail:
            raise RuntimeError("the forward failed")
        return out


def _expected(kind: str):
    return np.arange(N, dtype=np.float32) if kind == "array" else torch.arange(N, dtype=torch.float32)


def _equal(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else torch.equal(a, b)


@pytest.mark.parametrize("kind", ["array", "inference"])
def test_a_large_array_or_inference_tensor_written_in_place_comes_back(kind):
    """Vanilla gradient: the attribute (the same object) holds its values again after the call, after a failing call
    too, and after a second call from the copy kept across calls. Old code: each call left it one higher."""
    m = Writes(kind).eval()
    big = m.big
    x = torch.randn(1, 3, 8, 8)
    for _ in range(2):
        salience.METHODS["vanilla"](m, x, 1)
        assert m.big is big and _equal(m.big, _expected(kind))
    m.fail = True
    with pytest.raises(RuntimeError, match="the forward failed"):
        salience.METHODS["vanilla"](m, x, 1)
    assert m.big is big and _equal(m.big, _expected(kind))


def test_each_smoothgrad_pass_sees_the_large_array_found():
    """SmoothGrad's passes are samples of one function: each sees the array as the call found it (its record between
    passes, Found, now copies it too), and the array comes back. Old code: the passes saw 0, 1, 2."""
    m = Writes("array").eval()
    salience.smoothgrad(m, torch.randn(1, 3, 8, 8), 1, samples=3, chunk=1)
    assert len(m.seen) >= 3 and set(m.seen) == {0.0}
    assert np.array_equal(m.big, _expected("array"))


def test_the_large_arrays_copy_is_kept_across_calls_and_a_users_write_between_calls_stays():
    """The second call reuses the first call's copy (no new 1 MiB copy a call); the user's write of one value between
    two calls (no version counter, and a sampled check would miss it) is compared whole: it stays, and the forward's
    writes are put back to it."""
    m = Writes("array").eval()
    x = torch.randn(1, 3, 8, 8)
    salience.METHODS["vanilla"](m, x, 1)
    first = guard.KEPT[id(m.big)][3]
    salience.METHODS["vanilla"](m, x, 1)
    assert guard.KEPT[id(m.big)][3] is first
    m.big[12345] = -7.0  # the user's own write between calls: not one of the sampled places
    salience.METHODS["vanilla"](m, x, 1)
    want = _expected("array")
    want[12345] = -7.0
    assert np.array_equal(m.big, want)
    assert guard.KEPT[id(m.big)][3] is not first


Pair = collections.namedtuple("Pair", "cache log")


class InTuple(nn.Module):
    """A forward that writes the tensor in a tuple attribute and a namedtuple's, appends to a list in a tuple and writes
    a small NumPy array in a tuple inside a dict."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.fail = fail
        self.pair = (torch.zeros(4), [1])
        self.named = Pair(torch.ones(2), [])
        self.state = {"kv": (np.zeros(3), torch.zeros(2))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pair[0].add_(1.0)
        self.pair[1].append(2)
        self.named.cache.mul_(3.0)
        self.named.log.append("seen")
        self.state["kv"][0][:] = 5.0
        self.state["kv"][1].fill_(4.0)
        if self.fail:
            raise RuntimeError("the forward failed")
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("fail", [False, True])
def test_the_tensors_and_lists_in_tuples_come_back(fail):
    """Each written value back as it was, the same objects, also when the forward raises. Old code: all stayed."""
    m = InTuple(fail).eval()
    pair, named, kv = m.pair, m.named, m.state["kv"]
    x = torch.randn(1, 3, 4, 4)
    if fail:
        with pytest.raises(RuntimeError, match="the forward failed"):
            salience.METHODS["vanilla"](m, x, 1)
    else:
        salience.METHODS["vanilla"](m, x, 1)
    assert m.pair is pair and torch.equal(pair[0], torch.zeros(4)) and pair[1] == [1]
    assert m.named is named and torch.equal(named.cache, torch.ones(2)) and named.log == []
    assert m.state["kv"] is kv and np.array_equal(kv[0], np.zeros(3)) and torch.equal(kv[1], torch.zeros(2))


class Mapped(nn.Module):
    """A forward that writes a ``numpy.memmap`` attribute (its file) or replaces an object array's item."""

    def __init__(self, path, objects: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(1000,))
        self.objs = np.array([object() for _ in range(objects)] + [None], dtype=object)[:-1]
        self.write_map = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write_map:
            self.mm[:] = 9.0
        self.objs[0] = "replaced"
        return self.fc(x.mean((2, 3)))


def test_a_memmap_written_in_place_is_told_and_an_object_arrays_items_come_back(tmp_path):
    """The memmap (not copied: its file may be of any size) is told by a warning naming it and its file; a small object
    array's replaced item is put back by identity, a large one's is told. Old code: neither looked at, no warning."""
    m = Mapped(tmp_path / "table.bin", 10).eval()
    first = m.objs[0]
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"'mm' \(a numpy.memmap of .*table\.bin"):
        salience.METHODS["vanilla"](m, x, 1)
    assert m.objs[0] is first
    big = Mapped(tmp_path / "other.bin", 5000).eval()
    big.write_map = False
    with pytest.warns(UserWarning, match=r"'objs' \(an object array of 5000 items\)"):
        salience.METHODS["vanilla"](big, x, 1)
    with warnings.catch_warnings():  # unchanged since: no warning
        warnings.simplefilter("error")
        big.objs[0] = "replaced"
        salience.METHODS["vanilla"](big, x, 1)


def test_past_the_cap_the_least_recently_used_copies_are_dropped(monkeypatch):
    """A cap of three tables: a fourth table's copy drops the least recently used one (a table of a model no longer
    used), not the one reused meanwhile, and is kept. Old code: past the cap nothing more was kept."""
    monkeypatch.setattr(guard, "_KEEP_LIMIT", 3 * N * 4 + 100)
    guard.forget_copies()
    tables = [torch.zeros(N) for _ in range(4)]
    try:
        for t in tables[:3]:
            guard.kept_copy(t, t._version)
        kept = guard.kept_copy(tables[0], tables[0]._version)  # used again: the most recent
        guard.kept_copy(tables[3], tables[3]._version)
        assert set(guard.KEPT) == {id(tables[0]), id(tables[2]), id(tables[3])}
        assert guard.KEPT[id(tables[0])][3] is kept
        assert guard._kept_bytes == 3 * N * 4
        arrays = [np.zeros(N, np.float32) for _ in range(2)]  # NumPy arrays share the cap
        for a in arrays:
            guard.kept_values(a)
        assert set(guard.KEPT) == {id(tables[3]), id(arrays[0]), id(arrays[1])}
    finally:
        guard.forget_copies()
