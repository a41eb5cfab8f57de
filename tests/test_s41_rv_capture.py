"""Review of session 41's capture of a layer's output changed in place later in the forward (eca951e): a pass that
shows the change runs again on a copy. Each test fails on eca951e."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience

SIZE = 8


class NoisyBlock(nn.Module):
    """conv -> bn; ``out += proj`` in place after ``bn`` (as a ResNet block), then noise drawn in eval mode (a
    Monte-Carlo / noise-injection model), ReLU, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        out += self.proj(x)
        out = F.relu(out + torch.randn_like(out))
        return self.fc(out.mean(dim=(2, 3)))


def _reference(model: NoisyBlock, x: Tensor, target: int) -> Tensor:
    """Grad-CAM at ``bn`` from one pass written without in-place operations, on the noise that pass draws."""
    a = model.bn(model.conv(x)).detach().requires_grad_(True)
    out = a + model.proj(x)
    out = F.relu(out + torch.randn_like(out))
    score = model.fc(out.mean(dim=(2, 3)))[:, target].sum()
    (g,) = torch.autograd.grad(score, a)
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp(min=0)
    return F.interpolate(cam.detach()[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_second_pass_draws_the_same_random_numbers_as_the_first(device):
    """The pass run again on a copy must not draw new random numbers: the map is the one pass's of the seed (on
    eca951e the first call's map came from a second draw, another map than the same seed's later calls), and the
    generator after the call is where one pass leaves it."""
    torch.manual_seed(0)
    model = NoisyBlock().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model, x = model.to(device), torch.randn(2, 3, SIZE, SIZE).to(device)
    torch.manual_seed(5)
    want = _reference(model, x, 1)
    after_one_pass = torch.rand(3, device=device)
    torch.manual_seed(5)
    first = salience.gradcam(model, x, 1, layer=model.bn)  # the layer is not known yet: two passes
    after_first = torch.rand(3, device=device)
    torch.manual_seed(5)
    later = salience.gradcam(model, x, 1, layer=model.bn)  # known: one pass with a copy
    assert torch.allclose(later, want, atol=1e-6)
    assert torch.allclose(first, want, atol=1e-6)
    assert torch.equal(after_first, after_one_pass)


def test_scorecam_first_call_is_a_later_calls_map():
    """Score-CAM's capture (captured_pass) runs its pass again on the same random numbers: the first call with a seed
    gives the later calls' map (on eca951e its masked passes drew other noise)."""
    torch.manual_seed(1)
    model = NoisyBlock().eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.manual_seed(7)
    first = salience.scorecam(model, x, 2, layer=model.bn)
    torch.manual_seed(7)
    later = salience.scorecam(model, x, 2, layer=model.bn)
    assert torch.equal(first, later)


class SoftmaxBlock(nn.Module):
    """conv -> bn; ``out += proj`` in place after ``bn``; a ReLU module (its output ``h`` kept by ``h * h``'s
    backward: alive while the pass's graph is); a final softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.act, self.fc = nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        out += self.proj(x)
        h = self.act(out)
        return self.fc((h * h).mean(dim=(2, 3))).softmax(dim=1)  # the product keeps h for its backward


def test_first_pass_graph_freed_before_the_second_on_a_model_ending_in_softmax():
    """The first pass's graph (its saved tensors: ``h``) is gone when the second pass runs, also where
    the softmax tap kept the first pass's scores and probabilities (on eca951e it held the whole first graph
    through the second pass: two passes' memory on the first call)."""
    import weakref

    torch.manual_seed(0)
    model = SoftmaxBlock().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    outputs: list = []
    alive_at_second: list[bool] = []

    def hook(m: nn.Module, i: object, o: Tensor) -> None:
        if outputs:
            alive_at_second.append(outputs[0]() is not None)
        outputs.append(weakref.ref(o))

    handle = model.act.register_forward_hook(hook)
    try:
        salience.gradcam(model, x, 1, layer=model.bn)
    finally:
        handle.remove()
    # session 42: one pass (the capture copies the layer's values when it returns): no first graph held by a second
    assert alive_at_second == []
