"""Session 57, issue 15's memory: the noted scores of a many-pass CPU call keep no buffer grown between its passes.

:meth:`salience._core.derived.Derived.note_scores` kept, for the refusal of NaN / infinite scores, each item's bad
flags, image and classes in three buffers that started at 64 rows and were made again (a ``torch.cat`` into a buffer
twice the size) whenever a pass's items passed their end: for RISE's 400 items here 64, 128, 256 and 512 rows, every
one made between two passes' freed activations (the small blocks glibc carves from a pass's free blocks, session 43's
cause of RISE's heap growth). They were then made once at the call's items; a CPU pass's flags are now read at once
and only the bad ``(image, target, class)`` triples kept (tests/test_s57_rvmem2.py), so a call with no bad score keeps
nothing. The tests of what is kept failed on the doubling code; the maps are unchanged (the notes hold only the
refusal's bookkeeping).
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


def _kept(monkeypatch, call) -> tuple[int, int]:
    """``(rows noted, most entries the call's scope kept for its refusal after a note)``."""
    rows, kept = [0], [0]
    note = derived.Derived.note_scores

    def spy(self, key, bad, targets, owner=None):
        note(self, key, bad, targets, owner)
        rows[0] += bad.shape[0]
        kept[0] = max(kept[0], sum(len(v.found) for v in self._cpu.values()) + len(self._cpu))

    monkeypatch.setattr(derived.Derived, "note_scores", spy)
    call()
    return rows[0], kept[0]


CALLS = {
    # 400 items (200 masks x 2 images) in chunks of 4: 100 passes
    "rise": (lambda m: salience.rise(m, X, 1, masks=200, cell=3, chunk=4), 400),
    # 128 items (64 channels x 2 images; the layer has no ReLU after it: no channel skipped), chunks of 4
    "ablationcam": (lambda m: salience.ablationcam(m, X, 1, layer="2", chunk=4), 128),
    "scorecam": (lambda m: salience.scorecam(m, X, 1, layer="2", chunk=4), 128),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_noted_scores_keep_nothing_where_no_score_is_bad(monkeypatch, name):
    """The call's passes are noted (every item once) and, with no NaN score, nothing is kept: no buffer (first made
    at 64 rows and grown by doubling, then made once at the call's items) and no entry."""
    call, items = CALLS[name]
    m = _net()
    call(m)  # a first call: the memory probe's pass and the caches, as a warm call has them
    assert _kept(monkeypatch, lambda: call(m)) == (items, 0)


FIRST = {  # no chunk given: the engine's memory probe runs, in the first call of a model
    "rise": (lambda m: salience.rise(m, X, 1, masks=200, cell=3), 400),
    "ablationcam": (lambda m: salience.ablationcam(m, X, 1, layer="2"), 128),
    "scorecam": (lambda m: salience.scorecam(m, X, 1, layer="2"), 128),
}


@pytest.mark.parametrize("name", list(FIRST))
def test_a_first_call_s_probe_pass_notes_nothing_kept(monkeypatch, name):
    """A model's first call runs the engine's memory probe as a pass of its own (thrown away, its items run again):
    its rows are noted on top of the call's items, and nothing is kept."""
    call, items = FIRST[name]
    rows, kept = _kept(monkeypatch, lambda: call(_net()))
    assert rows >= items and kept == 0


def test_the_refusal_still_names_images():
    """A NaN score is still refused; notes of many rows keep only the bad triples."""
    m = _net(8)
    with torch.no_grad():
        m[5].bias[1] = float("nan")
    with pytest.raises(SalienceError, match=r"NaN or infinite"):
        salience.rise(m, X, 1, masks=40, cell=3, chunk=4)
    scope = derived.Derived()
    for i in range(40):
        scope.note_scores("k", torch.tensor([[i == 4], [False]]), [None])
    assert scope.bad_images("k") == ([(0, 0, None)], 2)
    assert [len(v.found) for v in scope._cpu.values()] == [1]


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
