"""Review of session 51's guard (``guard._kept``, Found's copies of large tensors kept across calls).

- A write between two calls that moves no version counter (``t.data[...] = v``, ``t.numpy()[...] = v``) kept the
  stale copy: a call whose passes write the table put the older values back, the user's write lost, and the passes
  after the first saw the older values. Told now where it reaches one of the sampled values (a whole-table write).
- The kept copies' lock was not re-entrant: a kept tensor that dies while its thread holds it (the garbage collector,
  which any allocation inside the lock may run, frees a model in a reference cycle) calls ``_forget``, which took the
  lock again: the thread hung for ever.
"""
import threading

import numpy as np
import torch
from torch import nn

import salience


class Seen(list):
    """A log of what the passes saw (a list subclass: the guard does not copy it)."""


class Table(nn.Module):
    """A plain tensor attribute over the guard's 1 MiB copy limit that each forward reads and writes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.table = torch.ones(300_000)  # 1.1 MiB
        self.seen = Seen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(self.table[1]))
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3)) * float(self.table[1]))
        self.table.add_(1.0)
        return out


def test_a_write_without_a_version_between_calls_is_not_undone_by_the_kept_copy():
    """The user scales the table through NumPy (no version counter moves) between two SmoothGrad calls: the second
    call's passes each see the scaled table (the state it found), and the table comes back scaled, not as the first
    call found it. The merge's code: the passes after the first saw 1.0, and the table came back all ones."""
    torch.manual_seed(0)
    m = Table().eval()
    x = torch.randn(1, 3, 8, 8)
    salience.smoothgrad(m, x, 1, samples=3, chunk=1)
    assert torch.equal(m.table, torch.ones(300_000))
    version = m.table._version
    m.table.numpy()[:] *= 5.0  # the user's write: no version counter moves
    assert m.table._version == version
    m.seen.clear()
    salience.smoothgrad(m, x, 1, samples=3, chunk=1)
    assert set(m.seen) == {5.0} and len(m.seen) >= 3
    assert torch.equal(m.table, torch.full((300_000,), 5.0))


def test_a_kept_copy_of_a_table_with_nans_is_reused():
    """A table with missing values (NaN) holds its kept copy across calls (NaN equal to NaN in the sampled check):
    no new copy a call."""
    from salience._core.guard import values as guard

    t = torch.full((300_000,), float("nan"))
    first = guard.kept_copy(t, t._version)
    assert guard.kept_copy(t, t._version) is first
    arr = np.asarray(t)  # a NumPy view of the tensor: a write through it is told
    arr[:] = 2.0
    again = guard.kept_copy(t, t._version)
    assert again is not first and torch.equal(again, t)
    guard._forget(id(t))
    t = torch.zeros(2 ** 24 + 3, dtype=torch.uint8)  # past float32's exact integers: the sampled places stay inside
    first = guard.kept_copy(t, t._version)
    assert guard.kept_copy(t, t._version) is first
    guard._forget(id(t))


def test_a_kept_tensor_dying_while_its_thread_holds_the_lock_does_not_hang():
    """The garbage collector may free a kept tensor at any allocation, inside ``_kept``'s lock too: its weak
    reference's callback takes the lock again in the same thread. The merge's plain Lock hung there for ever (the
    thread is a daemon: the test fails instead of hanging)."""
    from salience._core.guard import values as guard

    holder = [torch.zeros(300_000)]
    guard.kept_copy(holder[0], holder[0]._version)
    key = id(holder[0])
    assert key in guard.KEPT
    done = threading.Event()

    def drop() -> None:
        with guard._kept_lock:
            holder.clear()  # the tensor dies here, as in a collection run inside the lock
        done.set()

    threading.Thread(target=drop, daemon=True).start()
    hung = not done.wait(10)
    if hung:  # a plain Lock (any thread may release it): let the hung thread go, so the process can end
        guard._kept_lock.release()
    assert not hung, "the kept copies' lock deadlocked"
    assert key not in guard.KEPT


class Swap(nn.Module):
    """A forward that swaps the storage under a plain tensor attribute over 1 MiB (``self.big.data = t``), no write."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.big = torch.ones(300_000)  # 1.1 MiB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.big.data = torch.zeros(300_000)
        return self.conv(x).mean((2, 3)) * float(self.big[0] + 1)


def test_a_large_tensors_storage_swapped_and_put_back_is_not_told_lost():
    """The guard sets the storage back (its ``set_`` moves the version counter), and then took the tensor as written
    in place without a copy: a warning that the model "keeps those values" although it came back exactly. Now no
    warning, and the tensor is back on its storage with its values."""
    import warnings

    m = Swap().eval()
    big, ptr = m.big, m.big.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        salience.METHODS["vanilla"](m, torch.randn(1, 3, 4, 4), 1)
    assert m.big is big and m.big.data_ptr() == ptr and torch.equal(m.big, torch.ones(300_000))
