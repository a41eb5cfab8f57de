"""Session 57, issue 15's memory: the noted scores' buffers of a many-pass CPU call are made once, for the call's
items, not grown by doubling between its passes.

:class:`salience._core.derived._Noted` keeps, for the refusal of NaN / infinite scores, each item's bad flags, image
and classes. Before session 57 its three buffers started at 64 rows and were made again (a ``torch.cat`` into a buffer
twice the size) whenever a pass's items passed their end: for RISE's 400 items here 64, 128, 256 and 512 rows, four
buffers each, every one made between two passes' freed activations (the small blocks glibc carves from a pass's free
blocks, session 43's cause of RISE's heap growth). The engine now gives the call's number of items to its scope
(:func:`salience._core.derived.run_scope`), and the buffers are made once at that size. All 8 tests fail on the code
before (4 buffers of 64 to 512 rows for RISE, 2 for Ablation-CAM's 128 items; a buffer made at a later pass alive
passes after it; the last test by ``_Noted``'s new ``items`` argument only) and pass now; the maps are unchanged
(the buffers hold only the refusal's bookkeeping).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import salience
from salience import SalienceError
from salience._core import derived


def _net(channels: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5)).eval()


X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def _buffers(monkeypatch, call) -> list[tuple[int, int]]:
    """``(data pointer, rows)`` of every distinct ``bad`` buffer the call's noted scores were written into."""
    seen: list[tuple[int, int]] = []
    add = derived._Noted.add

    def spy(self, bad, img, cls, batch):
        add(self, bad, img, cls, batch)
        key = (self.bad.data_ptr(), int(self.bad.shape[0]))
        if key not in seen:
            seen.append(key)

    monkeypatch.setattr(derived._Noted, "add", spy)
    call()
    return seen


CALLS = {
    # 400 items (200 masks x 2 images) in chunks of 4: 100 passes
    "rise": (lambda m: salience.rise(m, X, 1, masks=200, cell=3, chunk=4), 400),
    # 128 items (64 channels x 2 images; the layer has no ReLU after it: no channel skipped), chunks of 4
    "ablationcam": (lambda m: salience.ablationcam(m, X, 1, layer="2", chunk=4), 128),
    "scorecam": (lambda m: salience.scorecam(m, X, 1, layer="2", chunk=4), 128),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_noted_scores_buffers_are_made_once_for_the_call_s_items(monkeypatch, name):
    call, items = CALLS[name]
    m = _net()
    call(m)  # a first call: the memory probe's pass and the caches, as a warm call has them
    seen = _buffers(monkeypatch, lambda: call(m))
    assert len(seen) == 1, seen  # before: (64, 128, 256, 512) rows for RISE, (64, 128) for the CAMs
    assert seen[0][1] == items, seen


FIRST = {  # no chunk given: the engine's memory probe runs, in the first call of a model
    "rise": (lambda m: salience.rise(m, X, 1, masks=200, cell=3), 400),
    "ablationcam": (lambda m: salience.ablationcam(m, X, 1, layer="2"), 128),
    "scorecam": (lambda m: salience.scorecam(m, X, 1, layer="2"), 128),
}


@pytest.mark.parametrize("name", list(FIRST))
def test_a_first_call_s_probe_pass_notes_nothing_kept(monkeypatch, name):
    """A model's first call runs the engine's memory probe as a pass of its own (thrown away, its items run again):
    its notes are forgotten after it, so the buffers are still made once at the call's items. Before (this
    session's first change alone): 130 rows noted for Ablation-CAM's 128 items, the buffers made again at 256."""
    call, items = FIRST[name]
    seen = _buffers(monkeypatch, lambda: call(_net()))
    assert len(seen) == 1, seen
    assert seen[0][1] == items, seen


def test_the_buffers_still_grow_past_their_size_and_the_refusal_still_names_images():
    """Notes past the buffers' size (a nested call's passes, which join the outer call's scope) still fit: the
    buffers double past it, as before; a NaN score is still refused."""
    m = _net(8)
    with torch.no_grad():
        m[5].bias[1] = float("nan")
    with pytest.raises(SalienceError, match=r"NaN or infinite"):
        salience.rise(m, X, 1, masks=40, cell=3, chunk=4)
    noted = derived._Noted(1, 3)
    for i in range(5):  # 5 x 2 rows into a buffer made for 3 (its floor: 64): grown only past 64
        noted.add(torch.tensor([[i == 4], [False]]), torch.tensor([0, 1]), torch.full((2, 1), -1), 2)
    assert noted.bad.shape[0] == 64 and noted.n == 10
    assert noted.found() == {(0, 0, None)}
    big = derived._Noted(1, 0)
    for i in range(40):
        big.add(torch.zeros(2, 1, dtype=torch.bool), torch.tensor([0, 1]), torch.full((2, 1), -1), 2)
    assert big.n == 80 and big.bad.shape[0] == 128  # past the floor: doubled, as before


class _Born(TorchDispatchMode):
    """The storages the operators under the mode create, by weak reference, each with the forward pass (counted by
    a pre-hook on the model) it was made in."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = 0
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s = t.untyped_storage()
                old = self.refs.get(s.data_ptr())
                if old is None or old[0].expired():
                    self.refs[s.data_ptr()] = (StorageWeakRef(s), self.passes)
        return out

    def alive_from(self, after: int) -> list[int]:
        """The passes that made the storages still alive, of those made after pass ``after``."""
        return sorted(p for r, p in self.refs.values() if not r.expired() and p > after)


LATE = {
    "rise": lambda m: salience.rise(m, X, 1, masks=200, cell=3, chunk=4),
    "ablationcam": lambda m: salience.ablationcam(m, X, 1, layer="2", chunk=4),
    "scorecam": lambda m: salience.scorecam(m, X, 1, layer="2", chunk=4),
    "occlusion": lambda m: salience.occlusion(m, X, 1, window=2, stride=1, chunk=4),
}


@pytest.mark.parametrize("name", list(LATE))
def test_nothing_made_in_a_chunk_outlives_the_next_pass(name):
    """What a call keeps across its chunks is made by its first passes: a storage made after the first eight passes is
    at most one pass old when a pass starts (what the pass before made for this one: the chunk's item indices, the
    deferred finiteness flag ``Derived.defer`` ORs anew each pass), never older. Before: RISE's noted-scores buffers
    made again at passes 18, 34 and 66 of 100 (4 items a pass) lived on through the passes after them, Ablation-CAM's,
    Score-CAM's and occlusion's (242 windows' items) the same from their 17th to 20th pass."""
    m = _net()
    LATE[name](m)  # the probe and the caches, as a warm call has them
    mode, old = _Born(), []

    def pre(mod, args):
        mode.passes += 1
        old.extend((mode.passes, p) for p in mode.alive_from(8) if p < mode.passes - 1)

    handle = m.register_forward_pre_hook(pre)
    try:
        with mode:
            LATE[name](m)
    finally:
        handle.remove()
    assert mode.passes >= 30, mode.passes  # enough passes past the first eight
    assert old == [], old[:8]  # (pass, the pass that made a storage still alive then)
