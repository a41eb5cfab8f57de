"""A layer's output read by a forward hook, whatever the rest of the forward changes in place (session 42). The capture
copies the output's values when the layer returns and differentiates the output's gradient edge, in one pass:

(a) a forward that reads state it changes itself (a counter buffer, a counter attribute) gives the map of one pass
    from the user's state (session 41 ran the first call's pass again, which saw the first pass's change);
(b) an output aliasing a tensor changed in place later under another name (the input an ``nn.Identity`` returns, a
    view ``nn.Flatten`` returns of it): its values as the layer returned them, the gradient through its uses, and the
    model's own output (session 41's second pass handed the rest a copy: another function than the model's, and kept
    the changed tensor);
(c) ``attention_maps(reduce=None)`` without gradients: each softmax's matrix as it was formed, as ``reduce=`` sees it,
    not after a later in-place change.

Each reference is the formula written out without in-place operations. Each test fails on session 41's code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience
from salience._core.autograd import gradients
from salience.attention import attention_maps
from salience.targets import as_target

SIZE = 6
TARGET = 1


def _cam(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM's formula from an activation and its gradient, upsampled as salience does."""
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp(min=0)
    return F.interpolate(cam[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]


class Counting(nn.Module):
    """conv -> bn (the layer); ``out += proj(x)`` in place after it, then a threshold that moves with a count of the
    calls the forward keeps itself: a buffer (``calls.add_(1)``) or a Python attribute (``self.n += 1``)."""

    def __init__(self, attribute: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.attribute = attribute
        self.n = 0
        self.register_buffer("calls", torch.zeros(()))

    def count(self) -> Tensor:
        if self.attribute:
            self.n += 1
            return torch.tensor(float(self.n))
        self.calls.add_(1)
        return self.calls

    def forward(self, x: Tensor) -> Tensor:
        c = self.count()
        out = self.bn(self.conv(x))
        out += self.proj(x)
        return self.fc(F.relu(out - 0.3 * c).mean(dim=(2, 3)))


def _counting_reference(model: Counting, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """bn's output, its gradient and the output of one pass with the count at 1 (one call from the user's state)."""
    a = model.bn(model.conv(x)).detach().requires_grad_(True)
    out = model.fc(F.relu(a + model.proj(x) - 0.3).mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(out[:, TARGET].sum(), a)
    return a.detach(), g, out.detach()


@pytest.mark.parametrize("attribute", [False, True], ids=["buffer", "attribute"])
def test_a_stateful_forward_is_one_pass_from_the_users_state(attribute):
    torch.manual_seed(0)
    model = Counting(attribute).eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, SIZE, SIZE)
    a, g, out = _counting_reference(model, x)
    p = gradients(model, x, as_target(TARGET), layers=[model.bn])
    torch.testing.assert_close(p.activations[0], a, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.layer_grads[0], g, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.output, out, rtol=0, atol=1e-6)
    cam = salience.gradcam(model, x, TARGET, layer=model.bn)  # first and later calls alike
    torch.testing.assert_close(cam, _cam(a, g), rtol=0, atol=1e-6)
    assert model.n == 0 and float(model.calls) == 0  # the user's state, put back


class Aliasing(nn.Module):
    """conv -> bn -> ``tap`` (the layer: an ``nn.Identity``, which returns its input itself, or an ``nn.Flatten``'s
    view of it, unflattened); the input changed in place after the layer under its own name (``h += proj(x)``); the
    layer's output read after that change (``view``: before it too)."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.tap = nn.Flatten(2) if view else nn.Identity()
        self.fc, self.view = nn.Linear(8, 3), view

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        a = self.tap(h)
        before = a.mean(dim=-1) if self.view else h.mean(dim=(2, 3))  # read before the change
        h += self.proj(x)
        after = F.relu(a).mean(dim=-1) if self.view else F.relu(a).mean(dim=(2, 3))  # a: h's memory, changed
        return self.fc(torch.cat([before, after], 1))


def test_b_an_output_that_is_its_input_changed_later_under_the_inputs_name():
    torch.manual_seed(1)
    model = Aliasing(view=False).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want_out = model(x.clone())
    a = model.bn(model.conv(x)).detach().requires_grad_(True)
    out = model.fc(torch.cat([a.mean(dim=(2, 3)), F.relu(a + model.proj(x)).mean(dim=(2, 3))], 1))
    (g,) = torch.autograd.grad(out[:, TARGET].sum(), a)
    torch.testing.assert_close(out.detach(), want_out)
    p = gradients(model, x, as_target(TARGET), layers=[model.tap])
    torch.testing.assert_close(p.output, want_out, rtol=0, atol=1e-6)  # the model's own function
    torch.testing.assert_close(p.activations[0], a.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(p.layer_grads[0], g, rtol=0, atol=1e-6)


def test_b_a_view_of_the_input_changed_later_under_the_inputs_name():
    """The values and the model's output as above (the gradient, through the uses after the change too:
    tests/test_s42_rv_capture.py)."""
    torch.manual_seed(2)
    model = Aliasing(view=True).eval()
    model.fc = nn.Linear(8, 3)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want_out = model(x.clone())
    p = gradients(model, x, as_target(TARGET), layers=[model.tap])
    h = model.bn(model.conv(x)).detach()
    torch.testing.assert_close(p.output, want_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.activations[0], h.flatten(2), rtol=0, atol=1e-6)


class ChangedAttention(nn.Module):
    """One attention over 4 patch tokens written with an explicit softmax; the matrix then changed in place after
    ``A @ v`` (``attn.mul_``: a buffer the model reuses, e.g. for a second read), its output read again."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv, self.head = nn.Conv2d(3, 8, 3, stride=3), nn.Linear(8, 24), nn.Linear(8, 3)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 4, 8)
        q, k, v = self.qkv(t).reshape(t.shape[0], 4, 3, 2, 4).permute(2, 0, 3, 1, 4)  # (B, 2 heads, 4, 4) each
        return q @ k.transpose(-2, -1) * 0.5, v

    def forward(self, x: Tensor) -> Tensor:
        s, v = self.scores(x)
        attn = s.softmax(dim=-1)
        out = attn @ v
        attn.mul_(0.5)
        out = out + attn @ v
        return self.head(out.transpose(1, 2).flatten(2).mean(1))


def test_c_attention_maps_without_reduce_are_the_matrices_as_formed():
    torch.manual_seed(3)
    model = ChangedAttention().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model.scores(x)[0].softmax(dim=-1)
    (got,) = attention_maps(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    (reduced,) = attention_maps(model, x, reduce=lambda a: a.sum(dim=1))  # reduce sees the matrix as formed
    torch.testing.assert_close(reduced, want.sum(dim=1), rtol=0, atol=1e-6)
    (viewed,) = attention_maps(model, x, reduce=lambda a: a[:, 0])  # a view reduce gives: as formed too
    torch.testing.assert_close(viewed, want[:, 0], rtol=0, atol=1e-6)
