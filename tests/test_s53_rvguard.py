"""Review of session 53's guard53 (ae7a655b: plain tensor attributes over 1 MiB put back from the kept copy, one helper
for the sampled places). Each test fails on ae7a655b:

a) a sparse plain tensor attribute whose dense size is over 1 MiB (a graph's adjacency: 3 stored values) was taken
   as large, given the kept copy, whose data pointer has no kernel for it: the record was dropped, and a forward's write
   in place stayed, silently (before ae7a655b it stayed too, told by a warning). Now copied per call and put back;
b) :class:`_Sampled`'s indices (a ``numpy.memmap`` attribute) were made on torch's default device: under
   ``with torch.device("meta")`` (or ``torch.set_default_device("cuda")``) the guard's entry raised a raw TypeError
   from ``.numpy()``, and the cache kept those indices for every later array of that size.
The references: the values the attribute held before the call; the guard's own warning for a memmap written.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience


class Sparse(nn.Module):
    """A forward that reads nothing of ``self.adj`` (a sparse COO tensor of 1000 x 1000, 3.8 MiB dense, 3 values) and
    doubles its values in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        at = torch.tensor([[0, 1, 2], [2, 0, 1]])
        self.adj = torch.sparse_coo_tensor(at, torch.tensor([1.0, 2.0, 3.0]), (1000, 1000),
                                           check_invariants=True).coalesce()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.adj.mul_(2.0)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["vanilla", "occlusion"])
def test_a_large_sparse_tensor_attribute_written_in_place_comes_back(method):
    """(a) The same object, its values as before the call, no warning. ae7a655b: doubled, silently."""
    m = Sparse().eval()
    adj, want = m.adj, m.adj.to_dense().clone()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            if method == "vanilla":
                salience.vanilla(m, x, 1)
            else:
                salience.occlusion(m, x, 1, window=4, stride=4)
            assert m.adj is adj and torch.equal(adj.to_dense(), want)


class Mapped(nn.Module):
    """A module holding a ``numpy.memmap`` (sampled by the guard, not copied)."""

    def __init__(self, path) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(5000,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_a_memmap_attribute_under_a_default_device_context(tmp_path):
    """(b) The guard entered under ``with torch.device("meta")`` (a model built on the meta device beside it), then
    outside: no error, and a write of the memmap's first value in the block told, as the guard's docstring says.
    ae7a655b: TypeError "can't convert meta device type tensor to numpy" at the entry, and again outside."""
    m = Mapped(tmp_path / "table.bin")
    with torch.device("meta"):
        with salience.model_guard(m):
            pass
    with pytest.warns(UserWarning, match="'mm'"):
        with salience.model_guard(m):
            m.mm[0] = 5.0
