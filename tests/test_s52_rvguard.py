"""Review of session 52's guard (``guard._kept_values``, ``guard.Found``, ``guard._same_values``).

- :class:`~salience._core.guard.Found` compared a NumPy array or inference tensor over 1 MiB whole before every pass
  (a 100 MiB table: SmoothGrad of 8 chunks 39 -> 709 ms, occlusion 40 -> 822 ms, an informal run): now by samples
  before each pass and whole once at the call's end, so the number of whole comparisons no longer grows with the chunks.
- A NumPy array the forward wrote and made read-only: the put-back raised NumPy's raw ValueError; now made
  writeable again and put back.
- A structured array with an object field was compared by the identity of its records (``numpy.void``, new objects at
  each read): changed at every call, though nothing wrote it.
"""
import collections

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience._core import guard
from salience._core.guard import values

N = 300_000  # float32: 1.1 MiB, over the guard's 1 MiB copy limit


class Table(nn.Module):
    """A model with a NumPy table over 1 MiB; ``write``: each pass writes one value of it at ``N // 2 + 1``, a place
    that none of the 1024 evenly spread samples reads (``(N - 1) // 1023`` apart), and logs the value it found."""

    def __init__(self, write: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.table = np.arange(N, dtype=np.float32)
        self.write, self.seen = write, collections.UserList()  # a list would be put back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write:
            self.seen.append(float(self.table[N // 2 + 1]))
            self.table[N // 2 + 1] = -1.0
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _whole_comparisons(monkeypatch, run) -> int:
    """How many times ``run()`` compares the model's large table whole (:func:`guard._same_bits` on over 1 MiB)."""
    counts = [0]
    real = values._same_bits

    def counting(a, b):
        if a.nbytes > values.COPY_LIMIT:
            counts[0] += 1
        return real(a, b)

    monkeypatch.setattr(values, "_same_bits", counting)
    run()
    monkeypatch.setattr(values, "_same_bits", real)
    return counts[0]


def test_a_large_array_is_compared_whole_a_fixed_number_of_times_a_call_not_once_a_chunk(monkeypatch):
    m, x = Table().eval(), torch.randn(1, 3, 8, 8)
    salience.smoothgrad(m, x, 1, samples=2, chunk=1)  # the kept copy taken
    few = _whole_comparisons(monkeypatch, lambda: salience.smoothgrad(m, x, 1, samples=2, chunk=1))
    many = _whole_comparisons(monkeypatch, lambda: salience.smoothgrad(m, x, 1, samples=8, chunk=1))
    assert few == many <= 4  # the guard's record and end, Found's record and end
    occl = _whole_comparisons(monkeypatch, lambda: salience.occlusion(m, x, 1, window=2, stride=2, chunk=1,
                                                                      local=False))
    assert occl == few  # 16 passes


def test_a_write_of_one_value_no_sample_reads_is_put_back_at_the_calls_end():
    m = Table(write=True).eval()
    salience.smoothgrad(m, torch.randn(1, 3, 8, 8), 1, samples=3, chunk=1)
    assert m.seen[0] == N // 2 + 1  # the first pass found the table as it was
    np.testing.assert_array_equal(m.table, np.arange(N, dtype=np.float32))


class Records(nn.Module):
    """A model with a structured array holding objects, which its forward never writes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.rows = np.array([("a", 1.5), ("b", float("nan"))], dtype=[("name", object), ("score", np.float64)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_structured_array_with_an_object_field_not_written_is_not_changed():
    m = Records()
    record = guard.record_state([m])
    assert guard.state_changes(record) == []
    m.rows["score"][0] = 2.5  # a write is still seen, and put back
    assert guard.state_changes(record) == [(0, "rows")]
    guard.put_back_state(record)
    assert m.rows["score"][0] == 1.5 and m.rows["name"][1] == "b"


class ReadOnly(nn.Module):
    """A forward that writes its NumPy table and then makes it read-only."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.table = np.arange(n, dtype=np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table[0] = -1.0
        self.table.flags.writeable = False
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("n", [1000, N])
def test_a_table_written_and_made_read_only_comes_back_writeable_with_its_values(n):
    m = ReadOnly(n)
    salience.vanilla(m, torch.randn(1, 3, 4, 4), 0)  # NumPy's raw "assignment destination is read-only" before
    assert m.table.flags.writeable
    np.testing.assert_array_equal(m.table, np.arange(n, dtype=np.float32))
