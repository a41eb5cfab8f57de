"""Session 53: the model comes back as it was, part 6 (``guard._tensor_records``, ``guard._written_quietly``,
``guard._trusted``).

- A plain tensor attribute over the guard's 1 MiB copy limit that the forward wrote in place (``self.table.mul_(2)``,
  an index assignment, a write through ``.data``) stayed as written, told by a warning: now put back from the copy kept
  across calls (``guard._kept``), a tensor among a container's items too, also when the forward raises; past the kept
  copies' cap, from a copy taken for the call.
- A write through ``.data`` moves no version counter: it stayed, whatever the tensor's size; now compared with the copy
  at the call's end (whole up to 1 MiB, by 1024 samples over it).
- A call of a perturbation method read a large NumPy array whole twice at its start (the guard's check of its kept
  copy, then Found's of the same copy): once now.
"""
import collections
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience._core import guard
from salience._core.guard import values
from salience.methods.integrated import CompletenessWarning

N = 2 ** 19  # float32: 2 MiB, over the guard's 1 MiB copy limit


def _table() -> torch.Tensor:
    """The table's values: distinct and non-zero past the first (a write of x2 changes every one but the first)."""
    return torch.arange(N, dtype=torch.float32) * 0.5 + 0.25


class Writes(nn.Module):
    """A forward that reads ``self.table`` and writes it in place (``how``: ``mul``, ``index``, ``data``), the table a
    plain attribute or (``boxed``) the first item of a list attribute; ``fail``: raises after the write."""

    def __init__(self, how: str = "mul", boxed: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.how, self.boxed, self.fail = how, boxed, fail
        if boxed:
            self.cache = [_table()]
        else:
            self.table = _table()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.cache[0] if self.boxed else self.table
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3))) * float(table[1])
        if self.how == "mul":
            table.mul_(2.0)
        elif self.how == "index":
            table[::3] = -1.0
        else:  # moves no version counter
            table.data.mul_(2.0)
        if self.fail:
            raise RuntimeError("the forward failed")
        return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _call(method: str, m: nn.Module, x: torch.Tensor) -> None:
    if method == "vanilla":
        salience.vanilla(m, x, 1)
    elif method == "smoothgrad":
        salience.smoothgrad(m, x, 1, samples=3, chunk=1)
    elif method == "integrated_gradients":
        salience.integrated_gradients(m, x, 1, steps=4)
    else:
        salience.occlusion(m, x, 1, window=4, stride=4)


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "integrated_gradients", "occlusion"])
@pytest.mark.parametrize("how", ["mul", "index", "data"])
def test_a_large_tensor_attribute_written_in_place_comes_back(method, how):
    """The attribute is the same object and holds its values bit for bit after each call, and no warning says it stays
    written. Old code: written by ``mul_`` or an index, it stayed (a warning); through ``.data``, it stayed silently."""
    with torch.random.fork_rng():  # the same weights whatever ran before in this process
        torch.manual_seed(0)
        m = Writes(how).eval()
    table = m.table
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # integrated gradients' completeness check at steps=4 on random weights is not this test's (CI of session 53:
        # a gap of 1.06 on unseeded weights raised here); only the guard's own warnings are errors
        warnings.filterwarnings("ignore", category=CompletenessWarning)
        for _ in range(2):  # the second call from the copy kept across calls
            _call(method, m, x)
            assert m.table is table and torch.equal(_bits(table), _bits(_table()))


@pytest.mark.parametrize("boxed", [False, True])
def test_an_exception_after_the_write_puts_it_back(boxed):
    """A forward that raises after writing the table (an attribute, or a list's item): the values come back. Old code:
    they stayed."""
    m = Writes("mul", boxed=boxed, fail=True).eval()
    table = m.cache[0] if boxed else m.table
    with pytest.raises(RuntimeError, match="the forward failed"):
        salience.vanilla(m, torch.randn(1, 3, 8, 8), 1)
    assert (m.cache[0] if boxed else m.table) is table and torch.equal(_bits(table), _bits(_table()))


@pytest.mark.parametrize("method", ["vanilla", "occlusion"])
def test_a_users_write_between_calls_stays_and_the_forwards_is_put_back(method):
    """The user writes one value (an index: its version moves) and then many through ``.data`` (no version moves; the
    sampled check sees it) between calls: the stale kept copy does not undo either, and the next call's own write is put
    back to the user's values. Old code: the forward's writes stayed."""
    m = Writes("mul").eval()
    x = torch.randn(1, 3, 8, 8)
    _call(method, m, x)
    first = values.KEPT[id(m.table)][3]
    m.table[12345] = -7.0
    want = _table()
    want[12345] = -7.0
    _call(method, m, x)
    assert torch.equal(_bits(m.table), _bits(want))
    assert values.KEPT[id(m.table)][3] is not first
    m.table.data[1:] += 1.0
    want[1:] += 1.0
    _call(method, m, x)
    assert torch.equal(_bits(m.table), _bits(want))


def test_past_the_cap_the_table_is_copied_for_the_call_and_put_back(monkeypatch):
    """With a cap smaller than the table no copy is kept (as for a NumPy array past it): each call copies it, and the
    forward's write is put back. Old code: it stayed written."""
    monkeypatch.setattr(values, "_KEEP_LIMIT", N)  # 512 KiB: under the 2 MiB table
    guard.forget_copies()
    m = Writes("mul").eval()
    for method in ("vanilla", "occlusion"):
        _call(method, m, torch.randn(1, 3, 8, 8))
        assert id(m.table) not in values.KEPT
        assert torch.equal(_bits(m.table), _bits(_table()))


class Logs(nn.Module):
    """A forward that logs ``self.big[12345]`` (a NumPy array over 1 MiB) and then (``write``) writes the whole array in
    place."""

    def __init__(self, write: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.big = np.arange(N, dtype=np.float32)
        self.write = write
        self.seen = collections.UserList()  # a log of the passes (a subclass: the guard does not put it back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(self.big[12345]))
        if self.write:
            self.big *= 2.0
        return self.fc(x.mean((2, 3)))


def _occlusion(m: nn.Module) -> None:
    salience.occlusion(m, torch.randn(1, 3, 8, 8), 1, window=4, stride=4)


def test_a_large_array_read_not_written_is_compared_whole_three_times_a_call(monkeypatch):
    """Occlusion on a model whose forward reads a 2 MiB NumPy array and writes nothing (a lookup table): the array is
    compared whole with its kept copy three times a call (the guard's entry; Found's end and the guard's exit), not four
    (Found compared again the copy the entry had just compared). Old code: four."""
    m = Logs(write=False).eval()
    _occlusion(m)  # the kept copy made
    reads: list = []
    same_bits = values._same_bits
    monkeypatch.setattr(values, "_same_bits", lambda a, b: reads.append(a.nbytes) or same_bits(a, b))
    _occlusion(m)
    assert reads.count(4 * N) == 3
    assert set(m.seen) == {12345.0}


def _users_write_seen(m: nn.Module) -> None:
    """The passes saw the user's write (-7), none the values before it (the copy the entry checked, stale), and the
    forward's writes were put back to it."""
    assert -7.0 in m.seen and 12345.0 not in m.seen
    want = np.arange(N, dtype=np.float32)
    want[12345] = -7.0
    assert np.array_equal(m.big, want)


def test_a_users_write_of_a_large_array_between_calls_is_what_the_passes_see_and_stays():
    """The user writes one value of the array between two occlusion calls (no version counter, no sampled place): the
    second call's passes see it (Found takes the copy the guard's entry compared and took again), and it stays after
    the call, the forward's writes put back. Passes on the old code too (a check that the cut copy is the right one)."""
    m = Logs().eval()
    _occlusion(m)
    m.big[12345] = -7.0
    m.seen.clear()
    _occlusion(m)
    _users_write_seen(m)


def test_a_found_inside_the_users_own_guard_compares_the_values_itself():
    """The user's own guard block, a write, then a call: the call's Found does not take the outer entry's check as its
    own (the inner entry drops it), so its passes see the user's write; the outer guard puts the array back at its
    end. Passes on the old code too."""
    m = Logs().eval()
    with guard.model_guard(m):
        m.big[12345] = -7.0
        _occlusion(m)
        _users_write_seen(m)
    assert np.array_equal(m.big, np.arange(N, dtype=np.float32))
