"""Session 46, the fixed cost a SmoothGrad call (docs/performance.md, "Session 46: where auto declines").

SmoothGrad's noisy copies of a chunk were made copy by copy: per copy a slice of ``x``, a ``torch.stack`` of its one
draw, a multiply by sigma and an add, then a ``torch.cat`` of the copies (16 copies: ~65 tiny tensor ops a chunk).
Now the chunk's draws are gathered first and the copies made with one multiply and one add. The noise stream and the
elementwise formula ``x + sigma * N(0, 1)`` are unchanged, so the copies (and the maps) keep their bits.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from salience.methods.smoothgrad import NoisyCopies


class _Ops(TorchDispatchMode):
    """The aten ops run under it, by name (``aten.mul.Tensor``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _x(b: int, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(b)).to(dtype) * 4 - 1


def _reference(x: torch.Tensor, noise: float, seed, start: int, stop: int) -> torch.Tensor:
    """Items ``start..stop-1`` by the documented stream, copy by copy: item ``j`` is copy ``j // B`` of image
    ``j % B``, ``x_b + sigma_b * N(0, 1)``, ``sigma_b = noise * (max - min)`` of image ``b``; an int seed: one float32
    draw of the batch's shape per copy; a list: one draw of ``(C, H, W)`` per copy from image ``b``'s own generator."""
    b = x.shape[0]
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    copies = (stop - 1) // b + 1
    if isinstance(seed, int):
        gen = torch.Generator().manual_seed(seed)
        draws = [torch.randn(tuple(x.shape), generator=gen).to(x.dtype) for _ in range(copies)]
        noise_of = lambda rep, i: draws[rep][i]  # noqa: E731
    else:
        gens = [torch.Generator().manual_seed(s) for s in seed]
        per = [[torch.randn(tuple(x.shape[1:]), generator=g).to(x.dtype) for _ in range(copies)] for g in gens]
        noise_of = lambda rep, i: per[i][rep]  # noqa: E731
    return torch.stack([x[j % b] + sigma[j % b] * noise_of(j // b, j % b) for j in range(start, stop)])


@pytest.mark.parametrize("b,seed,chunks", [(1, [5], [(0, 16)]), (1, [5], [(0, 5), (5, 16)]),
                                           (3, 7, [(0, 4), (4, 11), (11, 12)]), (3, [1, 2, 3], [(0, 7), (7, 12)]),
                                           (2, [4, 9], [(0, 16)])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_copies_keep_the_bits_of_the_copy_by_copy_formula(b, seed, chunks, dtype):
    """Every chunking (one, several copies per chunk, chunks across copies) gives, bit for bit, the copy-by-copy
    ``x + sigma * noise`` of the documented stream (the one multiply and add of a chunk are the same elementwise
    ops)."""
    x = _x(b, dtype)
    copies = NoisyCopies(x, 0.15, seed)
    for start, stop in chunks:
        got, owner = copies(start, stop)
        want = _reference(x, 0.15, seed, start, stop)
        assert got.dtype == dtype and torch.equal(owner, torch.arange(start, stop) % b)
        assert torch.equal(got, want), (start, stop)


def test_noise_zero_copies_are_x():
    x = _x(2)
    got, _ = NoisyCopies(x, 0.0, 3)(1, 6)
    assert torch.equal(got, x[torch.tensor([1, 0, 1, 0, 1])])


@pytest.mark.parametrize("b,seed", [(1, [0]), (2, [0, 1]), (2, 0)])
def test_a_chunk_of_noisy_copies_is_one_multiply_and_one_add(b, seed):
    """16 copies of a chunk: one ``mul`` and one ``add`` whatever the copies (there were 16 of each, plus 16 stacks and a
    cat), and one draw per copy and stream; the old code fails this (a count of the repeated work per chunk)."""
    x = _x(b)
    copies = NoisyCopies(x, 0.15, seed)
    with _Ops() as ops:
        copies(0, 16 * b)
    muls = sum(n for op, n in ops.seen.items() if op.startswith(("aten.mul.", "aten.mul_.")))  # in place too
    adds = sum(n for op, n in ops.seen.items() if op.startswith("aten.add"))
    stacks = sum(n for op, n in ops.seen.items() if op.startswith("aten.stack") or op.startswith("aten.cat"))
    draws = sum(n for op, n in ops.seen.items() if op.startswith("aten.randn") or op.startswith("aten.normal"))
    assert (muls, adds) == (1, 1), ops.seen
    assert stacks <= 1, ops.seen
    assert draws == 16 * (b if isinstance(seed, list) else 1), ops.seen


_BASE = "1c27e82"  # main before this change (session 46): its maps are the bits to keep
_MAPS = r"""
import sys, torch, salience
torch.manual_seed(0)
nn = torch.nn  # smooth activations: a ReLU net's input gradient is piecewise constant, blind to the copies' last bits
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Tanh(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
out = {
    "sg_int": salience.smoothgrad(model, x, 3, samples=8, seed=4),
    "sg_list": salience.smoothgrad(model, x, [1, 2], samples=6, seed=[5, 6], reduce=None, chunk=5),
    "sg_one": salience.smoothgrad(model, x[:1], 3, samples=16, seed=0, reduce=None, variant="vargrad"),
    "ig": salience.integrated_gradients(model, x, 3, steps=16, reduce=None),
    "vanilla": salience.vanilla(model, x, 3, reduce=None),
}
torch.save(out, sys.argv[1])
"""


def test_maps_keep_the_bits_of_main_before_the_change(tmp_path):
    """SmoothGrad (int seed, per-image seeds with chunks across copies, one image's vargrad), integrated gradients and
    vanilla gradients on a small convolutional network with smooth activations: the same bits as the code of main before this change (``git archive`` of
    it, run in a fresh process), in this process's own fresh process too."""
    got = saved_by_old_and_new(_BASE, _MAPS, tmp_path)
    assert got["old"].keys() == got["new"].keys()
    for key in got["old"]:
        assert torch.equal(got["old"][key], got["new"][key]), key


def saved_by_old_and_new(base: str, script: str, tmp_path) -> dict:
    """What ``script`` (Python run with the path of a file to ``torch.save`` to) saves under the code of commit ``base``
    (``git archive`` of its ``src``) and under this checkout's ``src``, each in a fresh process with one thread:
    ``{"old": ..., "new": ...}`` (skips where there is no git or no such commit)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    old = tmp_path / "old"
    old.mkdir()
    try:
        tar = subprocess.run(["git", "-C", str(repo), "archive", base, "src"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git or no commit {base} here: the archive of main before the change")
    subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
    got = {}
    for name, src in (("old", old / "src"), ("new", repo / "src")):
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.pt")], env=env, check=True)
        got[name] = torch.load(tmp_path / f"{name}.pt")
    return got
