"""Bytes the refusal of NaN scores keeps for one CPU call (no NaN score): occlusion of 8 images of 32 x 32, window 2,
stride 1 (961 windows, 7,688 items), K = 1 and 3 targets. A count, not a time: machine load does not change it.

    PYTHONPATH=src python benchmarks/noted_bytes_s57.py   # the code to measure on PYTHONPATH (a base checkout's src)
"""
from __future__ import annotations

import torch
from torch import nn

import salience
from salience._core import derived


def held(scope: derived.Derived) -> int:
    """Bytes of the tensors and entries the scope keeps for its CPU passes' refusal."""
    total = 0
    for noted in scope._cpu.values():
        for v in vars(noted).values():
            total += v.untyped_storage().nbytes() if isinstance(v, torch.Tensor) else 0
            total += 8 * len(v) if isinstance(v, set) else 0
    return total


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.rand(8, 3, 32, 32)
    note = derived.Derived.note_scores
    for target in (1, [[0, 1, 2]] * 8):
        peak = [0]

        def spy(self, key, bad, targets, owner=None):
            note(self, key, bad, targets, owner)
            peak[0] = max(peak[0], held(self))

        derived.Derived.note_scores = spy  # type: ignore[method-assign]
        try:
            salience.occlusion(model, x, target, window=2, stride=1, chunk=64)
        finally:
            derived.Derived.note_scores = note  # type: ignore[method-assign]
        k = 1 if target == 1 else 3
        print(f"occlusion 8 images, 7,688 items, K={k}: {peak[0]:,} bytes kept for the refusal")


if __name__ == "__main__":
    main()
