"""Review of session 45's chunk plan (docs/performance.md, "Session 45: the engine's chunk plan").

Since the plan, a run takes the record's final-softmax answer for every option set, so that a warm call runs the
folded copy (``fold_batchnorm``) from its first chunk: no eager pass of that call looks at the output. A folded copy
made after the user turned a softmax on by a flag of the forward (a new copy: the weights changed, so the process's
fold is made again) holds the softmax; on the reused "no softmax" answer its probabilities were explained, not the
logits (SmoothGrad's and integrated gradients' maps 85 % off; the one-pass methods' the same before the plan). The
folded copy's output is now looked at once, as a compiled model's is (``autograd.softmax_appeared``).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience._core import perf as _perf


class _Flagged(nn.Module):
    """A conv + BatchNorm model whose forward ends in a softmax when ``probs`` is on (a flag, not a module)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.f = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 8 * 8, 5)
        self.probs = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f(torch.relu(self.bn(self.c(x))).flatten(1))
        return y.softmax(-1) if self.probs else y


def _model() -> _Flagged:
    torch.manual_seed(0)
    m = _Flagged().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _logit_grad(m: _Flagged, xb: torch.Tensor, cls: int) -> torch.Tensor:
    """The input gradient of logit ``cls`` of one image ``(C, H, W)`` (the flag off: the model's logits)."""
    probs, m.probs = m.probs, False
    try:
        xg = xb.unsqueeze(0).clone().requires_grad_(True)
        return torch.autograd.grad(m(xg)[0, cls], xg)[0][0]
    finally:
        m.probs = probs


def _smoothgrad_by_hand(m: _Flagged, x: torch.Tensor, cls: int, seeds: list, samples: int, noise: float):
    """The documented stream: image b's copies x_b + sigma_b N(0, 1) from a generator seeded with seeds[b]."""
    out = []
    for b in range(x.shape[0]):
        gen = torch.Generator().manual_seed(seeds[b])
        sigma = noise * (x[b].max() - x[b].min())
        total = torch.zeros_like(x[b])
        for _ in range(samples):
            total += _logit_grad(m, x[b] + sigma * torch.randn(x[b].shape, generator=gen), cls)
        out.append(total / samples)
    return torch.stack(out)


def _ig_by_hand(m: _Flagged, x: torch.Tensor, cls: int, n: int) -> torch.Tensor:
    """Trapezoid IG from a zero baseline: x * sum_i w_i grad(a_i x), a_i = i / (n - 1)."""
    out = []
    for b in range(x.shape[0]):
        total = torch.zeros_like(x[b], dtype=torch.float64)
        for i in range(n):
            w = (0.5 if i in (0, n - 1) else 1.0) / (n - 1)
            total += w * _logit_grad(m, x[b] * (i / (n - 1)), cls).double()
        out.append((x[b].double() * total).float())
    return torch.stack(out)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    # the folded copy computes the same function: within float32 rounding of the map's largest value
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", "vanilla"])
def test_a_softmax_turned_on_by_a_flag_is_stripped_from_a_new_folded_copy(method):
    """Eager defaults with ``fold_batchnorm=True``: a first call (no softmax), then the flag on and a weight changed
    (the fold is made again, holding the softmax): the map is the logits' (``strip_softmax=True``, as in a fresh
    process), checked against the gradient formula by hand. Old code: 0.85 of the map's largest value off."""
    m, x, cls, seeds = _model(), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 1, [3, 4]

    def call() -> torch.Tensor:
        if method == "smoothgrad":
            return salience.smoothgrad(m, x, cls, samples=8, noise=0.1, seed=seeds, reduce=None)
        if method == "integrated_gradients":
            return salience.integrated_gradients(m, x, cls, steps=8, baseline=torch.zeros_like(x), reduce=None)
        return salience.vanilla(m, x, cls, reduce=None)

    _perf.clear_cache()
    with salience.performance(fold_batchnorm=True):
        call()
        call()  # warm: the record holds the answer "no softmax"
        m.probs = True
        with torch.no_grad():
            m.f.bias.add_(0.01)  # new weights: a new folded copy, made with the flag on
        got = call()
    assert m.probs is True  # the user's model as it was
    if method == "smoothgrad":
        ref = _smoothgrad_by_hand(m, x, cls, seeds, 8, 0.1)
    elif method == "integrated_gradients":
        ref = _ig_by_hand(m, x, cls, 8)
    else:
        ref = torch.stack([_logit_grad(m, x[b], cls) for b in range(2)])
    _close(got, ref)


def test_a_bounded_batch_is_split_evenly_too():
    """A program exported with ``Dim("batch", max=12)`` (``info.extra["max_batch"]``): SmoothGrad's 16 copies of
    one image run 8 + 8, the plan's even split under a cap of 12 (old code: the plan's 16, then cut to the bound:
    12 + 4); every pass within the bound; the map the documented noise's mean, by hand."""
    from dataclasses import replace

    from salience._core.info import attach_info, model_info
    m = _model()
    attach_info(m, replace(model_info(m), extra={"max_batch": 12}))
    sizes: list[int] = []
    handle = m.c.register_forward_pre_hook(lambda mod, a: sizes.append(a[0].shape[0]))
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    try:
        _perf.clear_cache()
        got = salience.smoothgrad(m, x, 1, samples=16, noise=0.1, seed=7, reduce=None)
    finally:
        handle.remove()
    assert sizes[-2:] == [8, 8] and max(sizes) <= 12, sizes
    _close(got, _smoothgrad_by_hand(m, x, 1, [7], 16, 0.1))


class _Bounded(nn.Module):
    """A linear model that refuses a batch over 4, as a program exported with ``Dim("batch", max=4)`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise RuntimeError(f"batch {x.shape[0]} over the exported bound 4")
        return self.l(x.flatten(1))


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_the_memory_probe_stays_within_a_bounded_batch(method):
    """8 images on a model bounded to batches of 4: the memory probe's pass (one item per image) ran all 8 at once
    and the model refused it (old code, before session 45 too). The maps are the closed forms of a linear model:
    SmoothGrad's mean gradient is the class's weight row for every copy; IG from a zero baseline is ``x * w``."""
    from dataclasses import replace

    from salience._core.info import attach_info, model_info
    torch.manual_seed(0)
    m = _Bounded().eval()
    attach_info(m, replace(model_info(m), extra={"max_batch": 4}))
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    w = m.l.weight[2].detach().view(1, 3, 8, 8)
    _perf.clear_cache()
    if method == "smoothgrad":
        got, ref = salience.smoothgrad(m, x, 2, samples=4, seed=0, reduce=None), w.expand(8, -1, -1, -1)
    else:
        got = salience.integrated_gradients(m, x, 2, steps=4, baseline=torch.zeros_like(x), reduce=None)
        ref = x * w
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
