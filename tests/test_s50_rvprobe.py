"""Session 50 review of the probe change (every chunk of SmoothGrad / integrated gradients starts from the model's own
state as the call found it, :class:`salience._core.guard.Found`).

A buffer of a ``torch.nn`` layer that the model's own code writes is put back from the model guard's copy, taken when
the outermost guard entered. A call nested in another's guard (integrated gradients or occlusion inside SmoothGrad's
chunks, or any method inside the user's own ``model_guard`` block after a pass of theirs) found that buffer at a later
version (the outer call's put-back is itself a write): its ``Found`` had no copy of the state it found and refused the
model with a :class:`SalienceError` before its second pass, where each method alone, and SmoothGrad around vanilla
gradients, take it. References: closed forms of a linear model scored as the call found it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

import salience


class _WritesALayersBuffer(nn.Module):
    """``fc(x) * (1 + m)`` with ``m`` the running mean of a ``torch.nn.BatchNorm1d`` that the forward raises by one
    first (in place; the layer itself is not run): as handed (``m = 0``) each forward scores ``2 * fc(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.bn.running_mean.add_(1.0)
        return self.fc(x.flatten(1)) * (1.0 + self.bn.running_mean[0])


def _pair() -> tuple[_WritesALayersBuffer, torch.Tensor]:
    torch.manual_seed(0)
    return _WritesALayersBuffer(), torch.randn(2, 3, 2, 2)


def _ig_closed_form(model: _WritesALayersBuffer, x: torch.Tensor, target: int, scale: float) -> torch.Tensor:
    """Integrated gradients of ``scale * fc`` with a zero baseline: ``x * scale * W[target]`` (exact for the
    trapezoid rule: the path integrand is constant)."""
    return x * (scale * model.fc.weight[target]).detach().reshape(3, 2, 2)


def test_smoothgrad_around_integrated_gradients_in_chunks_takes_the_model() -> None:
    """SmoothGrad (noise 0: the method itself) around integrated gradients whose path runs in chunks of one point:
    the inner call's second chunk refused the model (the outer chunk's put-back had moved the buffer's version past
    the guard's copy). Each pass scores the model as handed: ``x * 2 W[t]``."""
    model, x = _pair()
    ig = functools.partial(salience.integrated_gradients, chunk=1)
    out = salience.smoothgrad(model, x, 1, method=ig, samples=2, noise=0.0, chunk=1, steps=4, reduce=None)
    torch.testing.assert_close(out, _ig_closed_form(model, x, 1, 2.0), rtol=1e-5, atol=1e-6)
    assert float(model.bn.running_mean[0]) == 0.0


def test_smoothgrad_around_occlusion_takes_the_model() -> None:
    """The same for occlusion's passes inside SmoothGrad's chunks (refused since session 49). One window over the
    whole image, zero baseline: the drop of the model as handed, ``2 W[t] . x``, at every pixel."""
    model, x = _pair()
    out = salience.smoothgrad(model, x, 1, method=salience.occlusion, samples=2, noise=0.0, chunk=1, window=2,
                              stride=2, reduce=None)
    drop = 2.0 * (x.flatten(1) @ model.fc.weight[1].detach())
    torch.testing.assert_close(out, drop[:, None, None, None].expand_as(x), rtol=1e-5, atol=1e-6)
    assert float(model.bn.running_mean[0]) == 0.0


def test_a_method_in_the_users_guard_after_a_pass_of_theirs_sees_the_state_it_found() -> None:
    """Inside the user's own ``model_guard`` block, after a forward of theirs (the running mean now 1): integrated
    gradients in chunks scores the state it found (``1 + 2``: ``x * 3 W[t]``) on every chunk, instead of refusing;
    the block's end puts the model back as handed."""
    model, x = _pair()
    with salience.model_guard(model):
        model(x)
        out = salience.integrated_gradients(model, x, 0, steps=4, chunk=1, reduce=None)
        assert float(model.bn.running_mean[0]) == 1.0
    torch.testing.assert_close(out, _ig_closed_form(model, x, 0, 3.0), rtol=1e-5, atol=1e-6)
    assert float(model.bn.running_mean[0]) == 0.0
