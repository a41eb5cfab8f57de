"""A small net whose CAMs have closed forms, shared by the Grad-CAM and CAM-family tests."""
from __future__ import annotations

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
