"""The engine's memory probe counts a storage made under it even where the allocator hands it the
address of a storage that existed before the probe and was freed meanwhile: addresses were kept as
a plain set, so such a storage went uncounted and the peak (and with it the batch size of a dataset
run, ``runs.job.choose_batch``) depended on the allocator's reuse: a flaky batch size."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from salience._core.engine import MemoryProbe


class _AtTheFreedAddress(TorchDispatchMode):
    """Below the probe: the output of ``aten.ones`` made in ``pool`` (a NumPy buffer the test owns), where ``a``'s
    storage was. The storage is a new one (``a``'s is freed) at the freed address, on any allocator: the reuse that
    glibc gives only by the heap's history (the test skipped when it did not within 20 tries; session 49)."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.pool = pool

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.ones.default:
            return torch.from_numpy(self.pool).copy_(out)
        return out


def test_a_storage_at_a_freed_external_address_is_counted():
    import numpy as np

    n = 1 << 12
    pool = np.zeros(n, dtype=np.float32)
    a = torch.from_numpy(pool)
    addr = a.untyped_storage().data_ptr()
    probe = MemoryProbe()
    with _AtTheFreedAddress(pool), probe:  # the probe sees each operator first, then this mode makes its output
        b = a * 2  # a is seen as an input: a storage that existed before
        del a  # its storage freed under the probe (pool keeps the memory): the address is free for a new storage
        c = torch.ones(n)  # a new storage at that address
    assert c.untyped_storage().data_ptr() == addr and torch.equal(c, torch.ones(n))
    # b and c alive at the end, each n floats: the peak counts both
    assert probe.peak == 2 * 4 * n, probe.peak
    del b


def test_storages_that_existed_before_are_still_not_counted():
    w = torch.rand(1 << 14)
    x = torch.rand(1 << 10)
    probe = MemoryProbe()
    with probe:
        y = w[: 1 << 10] + x  # w and x existed before: only y is counted
    assert probe.peak == y.untyped_storage().nbytes()
