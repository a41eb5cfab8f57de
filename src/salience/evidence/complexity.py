"""Complexity: how concentrated is a map? Properties of the map alone, no model.

* :func:`sparseness`: the Gini index of the map's magnitudes (Chalasani et al., "Concise
  Explanations of Neural Networks using Adversarial Training", ICML 2020): 0 for a flat map,
  ``1 - 1/n`` for a single pixel; higher is sparser.
* :func:`complexity`: the entropy of the magnitudes' shares ``|m_i| / sum |m|`` (Bhatt et al.,
  "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020): ``log n`` for a
  flat map, 0 for a single pixel; lower is simpler.

Both take ``maps`` ``(B, H, W)`` and return ``(B,)``; ``NaN`` for an all-zero map. Both are
scale-free: each map's magnitudes are divided by their largest first, so a map of huge finite
values (float64 near its limit) is scored as its scaled copy, not as NaN from an overflowed sum.
"""
from __future__ import annotations

import torch
from torch import Tensor

from salience.evidence._checks import check_maps, scaled_magnitudes

__all__ = ["sparseness", "complexity"]


def sparseness(maps: Tensor) -> Tensor:
    """Gini index of ``|maps|`` per image: ``sum_i (2i - n - 1) a_(i) / (n sum a)`` with the
    magnitudes ``a`` sorted increasingly (``i = 1..n``), ``(B,)`` in ``[0, 1 - 1/n]``."""
    a = scaled_magnitudes(check_maps(maps)).flatten(1).sort(1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(1)
    g = ((2 * i - n - 1) * a).sum(1) / (n * total.clamp_min(1e-300))
    return torch.where(total > 0, g, torch.full_like(g, float("nan"))).float()


def complexity(maps: Tensor) -> Tensor:
    """Entropy (natural log) of each map's magnitude shares ``p_i = |m_i| / sum |m|``, ``(B,)``."""
    a = scaled_magnitudes(check_maps(maps)).flatten(1)
    total = a.sum(1, keepdim=True)
    p = a / total.clamp_min(1e-300)
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)
    return torch.where(total[:, 0] > 0, h, torch.full_like(h, float("nan"))).float()
