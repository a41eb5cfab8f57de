"""Review of session 42's bf16-mixed rule (:mod:`salience._core.islands`): attention, softmax and matrix products run
under the bf16 autocast whatever their sizes (``islands.PRODUCTS``). A matrix product by a weight,
``torch.matmul(h, w)`` on a channels-last ``(N, h, w, C)`` map, is a linear layer on the map (a 1x1 convolution, as
``F.linear`` and ``torch.einsum`` are, which stay under the rule): it ran in bf16, a ReLU after it gating in bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core.islands import HighResolutionFp32
from test_s49_record import ForwardLog

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

BF = torch.bfloat16


def test_a_matmul_by_a_weight_on_a_large_map_runs_in_fp32_in_every_spelling():
    g = torch.Generator().manual_seed(0)
    h, w = torch.rand(1, 16, 16, 8, generator=g), torch.rand(8, 4, generator=g)  # channels-last map of a 16 px input
    q = torch.rand(1, 2, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        by_function = torch.matmul(h, w)  # was bf16
        by_keyword = torch.matmul(input=h, other=w)  # was bf16
        by_method, by_operator = h.matmul(w), h @ w  # were bf16
        linear = F.linear(h, w.T)  # the same product as a linear layer: fp32 before and after
        attention = q @ q.transpose(-2, -1)  # two batched operands: bf16 before and after
        attention_fn = torch.matmul(q, q.transpose(-2, -1))
    exact = torch.matmul(h, w)
    for t in (by_function, by_keyword, by_method, by_operator):
        assert t.dtype == torch.float32 and torch.equal(t, exact)
    assert linear.dtype == torch.float32 and torch.allclose(linear, exact, atol=1e-6)
    assert attention.dtype == attention_fn.dtype == BF and torch.equal(attention, attention_fn)


class _MatmulCNN(nn.Module):
    """1x1 convolutions written as ``torch.matmul`` on a channels-last map, each with a ReLU (the gates)."""

    def __init__(self, c=16):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.w = nn.ParameterList([nn.Parameter(torch.randn(c, c) / c ** 0.5) for _ in range(3)])
        self.fc = nn.Linear(c, 3)
        self.seen = ForwardLog()  # the guard puts back a plain list

    def forward(self, x):
        h = F.relu(self.stem(x)).permute(0, 2, 3, 1)  # (n, 16, 16, c)
        for w in self.w:
            y = torch.matmul(h, w)
            self.seen.append(y.dtype)
            h = F.relu(y) + h
        return self.fc(h.mean((1, 2)))


def test_a_cnn_whose_1x1_convolutions_are_matmuls_keeps_its_maps_in_fp32():
    model, x = _MatmulCNN().eval(), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fp32 = salience.vanilla(model, x, 1)
    with salience.performance(precision="bf16"):
        plain = salience.vanilla(model, x, 1)
    model.seen.clear()
    with salience.performance(precision="bf16-mixed"):
        mixed = salience.vanilla(model, x, 1)
    assert set(model.seen) == {torch.float32}  # was bfloat16
    err = float((mixed - fp32).norm() / fp32.norm())
    assert err < 0.2 * float((plain - fp32).norm() / fp32.norm())  # measured: 0.0010 (the merge 0.013), bf16 0.016
