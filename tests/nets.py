"""Small nets with closed forms, shared by several test files."""
from __future__ import annotations

import torch
from torch import nn


class CamNet(nn.Module):
    """features (conv, ReLU) -> global average pool -> linear: Grad-CAM and the CAM family have
    closed forms in the linear head's weights."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class LinearScore(nn.Module):
    """Two outputs ``[sum(w * x), 0]``: removing pixels to zero drops output 0 by their ``w * x``, and
    the softmax probability of class 0 is ``sigmoid(sum(w * x))``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


class RenamedLayersNet(nn.Module):
    """A second model for comparisons, its layers named unlike demo:shapes's (``body.0``, ``top``): 5
    classes from 3-channel images, one convolution, global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.top = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.body(x).mean((2, 3)))


class TanhSpike(nn.Module):
    """``f(x) = a tanh(b (s - c))``, ``s = sum(x)``, one output: its gradient ``a b sech^2(b (s - c))``
    spikes at ``s = c``; with ``c = 0`` at the black baseline, as LayerNorm's does on a constant image.
    A large ``b``: integrated gradients' trapezoid weighs the baseline's gradient ``a b`` and is off by
    far (it warns); a tiny ``b``: ``f`` is linear where it is evaluated (no warning)."""

    def __init__(self, a: float, b: float, c: float = 0.0) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * torch.tanh(self.b * (x.flatten(1).sum(1) - self.c)))[:, None]


class WarnsNet(nn.Module):
    """A small classifier (one convolution, global average pooling, 5 classes from 3-channel images)
    that warns ``text`` at each forward pass: every map, curve and sanity check computed on it
    raises that warning (the explorer must show it as text, whatever markup it holds)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.text = text
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.top = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import warnings

        warnings.warn(self.text, UserWarning, stacklevel=2)
        return self.top(self.body(x).mean((2, 3)))
