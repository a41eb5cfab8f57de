"""Review of session 57's noted scores ("mem2"): the refusal of NaN / infinite scores keeps nothing per item on the CPU.

:meth:`salience._core.derived.Derived.note_scores` kept, for a CPU call, three buffers of the call's items (made once
at the engine's item count): each item's bad flags, image and classes, 8 + 9K bytes an item of K targets
(K + 8 + 8K), made and zeroed at the first pass whether or not any score is bad (occlusion's 1,000,000 windows of 8
images, one target: 130 MiB for a message that almost never comes). A CPU tensor's read waits for no device, so each
pass's flags are now read at once and only the bad ``(image, target, class)`` triples kept (a set: at most images x
targets x classes).

7 of the 22 tests fail on the code before: the 5 of ``test_a_call_without_bad_scores_keeps_no_tensor`` and
``test_the_notes_do_not_grow_with_the_items`` (the buffers' bytes, 8 + 9K an item), and
``test_a_thrown_away_pass_is_forgotten_and_earlier_notes_kept`` (a key first noted in a pass thrown away kept its
buffer and its number of images: ``([], 4)``, not ``([], None)``; no message changed by it). The refusal's messages
(named images, targets, classes; a first call with the memory probe's pass, chunk given, several targets; two threads
on one model) are the same before and after: the fix changes what is kept, not what is said.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import derived


class _Net(nn.Module):
    """Class 1's score is NaN for the images marked by a pixel above 5 in channel 2 (two corners: no window, mask
    or channel of the methods here removes both marks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.f(x))
        marked = x[:, 2].amax(dim=(1, 2)) > 5.0
        nan = torch.zeros_like(out)
        nan[:, 1] = float("nan")
        return torch.where(marked[:, None], out + nan, out)


def _x(marked: tuple[int, ...] = ()) -> torch.Tensor:
    x = torch.rand(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    for i in marked:
        x[i, 2, 0, 0] = x[i, 2, 9, 9] = 9.0
    return x


CALLS = {
    "rise": lambda m, x, t, **kw: salience.rise(m, x, t, masks=20, cell=3, softmax="none", **kw),
    "occlusion": lambda m, x, t, **kw: salience.occlusion(m, x, t, window=3, stride=1, **kw),
    "occlusion-full": lambda m, x, t, **kw: salience.occlusion(m, x, t, window=3, stride=2, local=False, **kw),
    "scorecam": lambda m, x, t, **kw: salience.scorecam(m, x, t, layer="f.2", softmax="none", **kw),
    "ablationcam": lambda m, x, t, **kw: salience.ablationcam(m, x, t, layer="f.2", **kw),
    "smoothgrad": lambda m, x, t, **kw: salience.smoothgrad(m, x, t, samples=6, **kw),
    "ig": lambda m, x, t, **kw: salience.integrated_gradients(m, x, t, steps=5, **kw),
}


def _held_bytes(scope: derived.Derived) -> int:
    """The bytes of the tensors the scope keeps for its refusal of CPU passes' NaN scores."""
    return sum(v.untyped_storage().nbytes() for noted in scope._cpu.values() for v in vars(noted).values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", ["rise", "occlusion", "scorecam", "ablationcam", "smoothgrad"])
def test_a_call_without_bad_scores_keeps_no_tensor(monkeypatch, name):
    """No NaN score: after each pass's note the call's scope holds no tensor for the refusal. Before: the three
    buffers of the call's items (occlusion here: 64 windows x 4 images x 17 bytes = 4,352)."""
    held, notes = [], []
    note = derived.Derived.note_scores

    def spy(self, key, bad, targets, owner=None):
        note(self, key, bad, targets, owner)
        notes.append(bad.shape[0])
        held.append(_held_bytes(self))

    monkeypatch.setattr(derived.Derived, "note_scores", spy)
    m = _Net()
    CALLS[name](m, _x(), 1)  # a first call: the memory probe's pass too
    CALLS[name](m, _x(), 1, chunk=4)
    assert sum(notes) > 0 and max(held) == 0, (sum(notes), max(held))


def test_the_notes_do_not_grow_with_the_items():
    """1,000 CPU passes of 1,000 items (two targets) with one bad score: one triple kept, no tensor, whatever the
    number of items. Before: 8 + 9K bytes an item, grown to 1,048,576 rows (26 MiB at K = 2)."""
    scope = derived.Derived()
    for p in range(1000):
        bad = torch.zeros(1000, 2, dtype=torch.bool)
        if p == 500:
            bad[7, 1] = True  # item 500,007 of 4 images: image 3
        scope.levels[:] = [(p * 1000, 4)]  # the engine's running chunk (chunk_items)
        scope.note_scores("finite:scores", bad, [salience.targets.classes(2), salience.targets.classes(3)])
    assert _held_bytes(scope) == 0
    assert scope.bad_images("finite:scores") == ([(3, 1, 3)], 4)


def test_a_thrown_away_pass_is_forgotten_and_earlier_notes_kept():
    scope = derived.Derived()
    bad = torch.zeros(4, 1, dtype=torch.bool)
    bad[1] = True
    scope.note_scores("finite:scores", bad, [None])
    saved = scope.snapshot()
    scope.note_scores("finite:scores", torch.ones(4, 1, dtype=torch.bool), [None])
    scope.note_scores("finite:target", torch.ones(4, 1, dtype=torch.bool), [None])
    scope.restore(saved)
    assert scope.bad_images("finite:scores") == ([(1, 0, None)], 4)
    assert scope.bad_images("finite:target") == ([], None)
    scope.note_scores("finite:scores", bad.roll(1), [None])  # notes after a restore still count
    assert scope.bad_images("finite:scores") == ([(1, 0, None), (2, 0, None)], 4)


PERTURBED = "the model's scores of the perturbed images are NaN or infinite"
TARGET = "the target's score is NaN or infinite"


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("chunk", [None, 3])
def test_the_refusal_names_the_marked_images_and_the_target(name, chunk):
    """Images 0 and 3 give NaN for class 1: every method, in a first call (the probe's pass, its notes forgotten) and
    a second, names those two images and class 1; with two targets (classes 0 and 1) the second target only."""
    m, head = _Net(), TARGET if name in ("smoothgrad", "ig") else PERTURBED
    for _ in range(2):
        with pytest.raises(SalienceError) as e:
            CALLS[name](m, _x((0, 3)), 1, chunk=chunk)
        assert str(e.value).startswith(head + " (images 0, 3 of 4, class 1)"), str(e.value)[:200]
    with pytest.raises(SalienceError) as e:
        CALLS[name](m, _x((2,)), [[0, 1]] * 4, chunk=chunk)
    assert str(e.value).startswith(head + " (image 2 of 4; target 2 of 2, class 1)"), str(e.value)[:200]
    CALLS[name](m, _x((1,)), 3, chunk=chunk)  # another class: no refusal


def test_two_threads_on_one_model_name_their_own_images():
    m, said = _Net(), {}

    def run(marked: tuple[int, ...]) -> None:
        out = []
        for _ in range(3):
            try:
                salience.rise(m, _x(marked), 1, masks=40, cell=3, chunk=2, softmax="none")
            except SalienceError as e:
                out.append(str(e)[len(PERTURBED):].split(")")[0])
        said[marked] = out

    threads = [threading.Thread(target=run, args=(marked,)) for marked in ((0,), (3,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert said == {(0,): [" (image 0 of 4, class 1"] * 3, (3,): [" (image 3 of 4, class 1"] * 3}
