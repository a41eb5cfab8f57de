"""Last read of session 52: the merges together (the guard's kept copies of large NumPy attributes, occlusion's
trace of the call ``model(x)`` (``_Called``), the small-input default layer).

- A forward of several inputs whose call ``model(x)`` cannot be traced either: the debug line said "the model has no
  local prefix (... none)" (the several-input trace has no fields), not why; now it says so (the maps are full passes',
  as before).
- A Hugging Face-like forward (``**kwargs``, a check of the channel count) holding a large NumPy table it writes in
  place: still region-limited, the maps those of full passes, the table and a plain attribute as they were.
- The default layer of a small input, on a model holding a large NumPy table and a tuple of a tensor and an array
  that its forward writes: the pick of the same model without them, and the attributes as they were.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

import salience
from salience.methods._layer_search import default_layer

LOG = "salience.occlusion"


def _occlusion(caplog, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Region-limited (default) and full-pass maps of ``model`` on ``x``, and the debug lines of the first."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG):
        a = salience.occlusion(model, x, 1, window=8, stride=4)
    told = " ".join(r.getMessage() for r in caplog.records if r.name == LOG)
    b = salience.occlusion(model, x, 1, window=8, stride=4, local=False)
    return a, b, told


class _MaskAndShape(nn.Module):
    """``forward(x, mask=None)`` (fx makes ``mask`` an input) that passes ``x.shape`` whole to a tensor method, which
    the call's trace (channels known) cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        if mask is not None:
            y = y * 0
        return self.fc(y.mean((2, 3))) + x.new_zeros(x.shape).sum()


def test_several_inputs_and_an_untraceable_call_tell_why(caplog) -> None:
    torch.manual_seed(0)
    model, x = _MaskAndShape().eval(), torch.randn(1, 3, 32, 32)
    a, b, told = _occlusion(caplog, model, x)
    assert "full passes" in told and "more inputs than the images" in told, told
    assert "no local prefix" not in told, told
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert b.abs().max() > 0


class _HfLike(nn.Module):
    """``**kwargs`` and a channel check (traced as the call ``model(x)``), a 12 MiB NumPy table and a counter the
    forward writes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.table = np.arange(3_000_000, dtype=np.float32)
        self.count = 0
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor, labels=None, **kwargs) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        self.count = self.count + 1
        self.table[5] += 1.0
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.fc(y.mean((2, 3)))


def test_call_trace_with_a_large_numpy_table_stays_region_limited(caplog) -> None:
    torch.manual_seed(0)
    model, x = _HfLike().eval(), torch.randn(2, 3, 32, 32)
    table, state = model.table, {k: v.clone() for k, v in model.state_dict().items()}
    a, b, told = _occlusion(caplog, model, x)
    assert "region-limited passes" in told, told
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert b.abs().max() > 0
    assert model.table is table and model.table[5] == 5.0 and np.array_equal(table, np.arange(3_000_000))
    assert model.count == 0 and not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class _Block(nn.Module):
    def __init__(self, c: int, o: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, o, 3, 2, 1)
        self.b = nn.Conv2d(o, o, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x))))


class _Small(nn.Module):
    """Stages halving a 16 px input down to one cell; with ``extra``, a 12 MiB NumPy table and a tuple of a tensor and
    an array, all written in place by the forward."""

    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.s1 = _Block(8, 16)
        self.s2 = nn.Sequential(_Block(16, 32), _Block(32, 32))
        self.fc = nn.Linear(32, 10)
        self.extra = extra
        if extra:
            self.table = np.zeros(3_000_000, np.float32)
            self.pair = (torch.zeros(3), np.zeros(5, np.float32), "x")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra:
            self.table[0] += 1
            self.pair[0].add_(1)
            self.pair[1][0] += 1
        return self.fc(self.s2(self.s1(torch.relu(self.stem(x)))).mean((2, 3)))


def test_default_layer_with_large_numpy_and_tuple_attributes() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    plain, held = _Small(False).eval(), _Small(True).eval()
    held.load_state_dict(plain.state_dict())
    pair = held.pair
    assert default_layer(held, x) == default_layer(plain, x) == "s2.0"
    assert held.table[0] == 0 and not held.table.any()
    assert held.pair is pair and torch.equal(pair[0], torch.zeros(3)) and pair[1][0] == 0
