"""Review of session 42's capture (copy at return, gradient at the output's gradient edge): a layer that returns a
*view* (``nn.Flatten``'s output, a slice, a permutation) which the rest of the forward changes in place.

An in-place operation on a view, or on its base, rebases the view on the base's new version: its later uses reach, in
autograd, the base's old gradient edge through the in-place node, never the view's own edge (a ``ViewBackward``
node). Differentiated at the view's edge, the layer's gradient missed every use after the change: zero after
``flatten`` and an in-place ReLU (session 41's second pass got it right). The capture now differentiates the base's
edge and reads the view's part of it.

References: the model run with a hand-written hook that keeps the layer's output and hands the rest of the forward a
clone of it (``torch.autograd.grad`` w.r.t. the kept output; the model's output is the same here, checked), and the
formula written out without in-place operations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.autograd import backward, gradients
from salience.targets import as_target

SIZE = 6
TARGETS = (1, 2)


class Narrow(nn.Module):
    """Channels 1 and 2 of its input: a view (a slice with the input's strides, at an offset)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 1:3]


class Permute(nn.Module):
    """Channels last: a view with permuted strides."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ViewThenInplace(nn.Module):
    """conv -> bn -> ``tap`` (the layer, returning a view of bn's output) -> in-place scale and ReLU of that view
    -> mean -> linear. bn's output is not read otherwise: a clone handed on at ``tap`` computes the same output."""

    def __init__(self, tap: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.tap = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), tap
        self.fc = nn.LazyLinear(3)

    def pooled(self, a: Tensor) -> Tensor:
        if isinstance(self.tap, Permute):
            return a.mean(dim=(1, 2))
        return a.flatten(2).mean(-1) if a.dim() == 4 else a.mean(-1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tap(self.bn(self.conv(x)))
        a.mul_(1.5)
        a.relu_()
        return self.fc(self.pooled(a))


def _reference(model: nn.Module, x: Tensor, target: int) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's output, its gradient and the model's output, the rest of the forward handed a clone."""
    kept: list[Tensor] = []
    handle = model.tap.register_forward_hook(lambda m, i, o: (kept.append(o), o.clone())[1])
    try:
        out = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(out[:, target].sum(), kept[0])
    return kept[0].detach(), g, out.detach()


@pytest.mark.parametrize("tap", [nn.Flatten(2), Narrow(), Permute()], ids=["flatten", "slice", "permute"])
def test_a_view_changed_in_place_under_its_own_name_has_its_gradient(tap):
    torch.manual_seed(0)
    model = ViewThenInplace(tap).eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model(x)  # the lazy layer's shape
        want_out = model(x)
    g = backward(model, x, [as_target(t) for t in TARGETS], layers=[model.tap])  # several targets: K passes
    for k, t in enumerate(TARGETS):
        a, grad, out = _reference(model, x, t)
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)  # the clone did not change the model's function
        torch.testing.assert_close(g.output, want_out, rtol=0, atol=1e-6)
        torch.testing.assert_close(g.activations[0], a, rtol=0, atol=0)
        assert grad.abs().sum() > 0
        torch.testing.assert_close(g.layer_grads[0][k], grad, rtol=1e-5, atol=1e-7)


class FlattenAlias(nn.Module):
    """conv -> bn (``h``) -> ``nn.Flatten`` (the layer: a view of ``h``), read before ``h += proj(x)`` and after it
    (then through an in-place ReLU on the view)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.tap, self.fc = nn.Flatten(2), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        a = self.tap(h)
        before = a.mean(dim=-1)
        h += self.proj(x)
        after = a.relu_().mean(dim=-1)  # a: h's memory, changed under h's name, then under its own
        return self.fc(torch.cat([before, after], 1))


def test_a_view_whose_base_is_changed_later_has_the_gradient_of_its_uses_after_the_change():
    """The formula: ``out = fc([mean(a), mean(relu(a + proj(x)))])`` with ``a`` bn's output flattened; its gradient
    w.r.t. ``a`` counts both uses (at the view's own edge only the first was counted)."""
    torch.manual_seed(2)
    model = FlattenAlias().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want_out = model(x.clone())
    a = model.bn(model.conv(x)).flatten(2).detach().requires_grad_(True)
    out = model.fc(torch.cat([a.mean(-1), F.relu(a + model.proj(x).flatten(2)).mean(-1)], 1))
    torch.testing.assert_close(out.detach(), want_out)
    (grad,) = torch.autograd.grad(out[:, 1].sum(), a)
    p = gradients(model, x, as_target(1), layers=[model.tap])
    torch.testing.assert_close(p.output, want_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.activations[0], a.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(p.layer_grads[0], grad, rtol=1e-5, atol=1e-7)


def test_an_unchanged_view_is_the_tensor_itself():
    """A view nothing changes after: read and differentiated as the tensor (bit for bit the plain capture)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2), nn.Flatten(1), nn.Linear(4 * SIZE * SIZE, 3))
    x = torch.randn(2, 3, SIZE, SIZE)
    kept: list[Tensor] = []
    handle = model[1].register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[:, 1].sum(), kept[0])
    p = gradients(model, x, as_target(1), layers=[model[1]])
    assert torch.equal(p.layer_grads[0], grad) and torch.equal(p.activations[0], kept[0].detach())
