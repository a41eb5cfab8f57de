"""precision="bf16" / "bf16-mixed" on a CPU with torchvision's ViT (session 42, :mod:`salience._core.strided`):
``nn.MultiheadAttention(batch_first=True)`` hands ``F.linear`` a strided ``(tokens, batch, dim)`` view, which a CPU
bf16 autocast runs pathologically slowly (vit_b_16's vanilla of 2 images: 6.9x fp32's time). Under salience's bf16
passes ``F.linear`` now gets a contiguous copy of it: same values, gradients through, the model untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torchvision.models.vision_transformer import VisionTransformer

import salience
import salience._core.perf as perf
from salience._core.strided import ContiguousAttention

pytestmark = pytest.mark.usefixtures("fresh_perf_state")


def _vit() -> nn.Module:
    torch.manual_seed(0)  # 32 px, 8 px patches: 17 tokens of 16, two blocks, two heads
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: a zero map
    return model


def _linear_inputs(monkeypatch) -> list:
    """Spy on ``F.linear`` (the module attribute: ``nn.Linear`` and ``F.multi_head_attention_forward`` call it)."""
    seen, real = [], F.linear

    def spy(x, *args, **kwargs):
        seen.append((x.dim(), x.is_contiguous()))
        return real(x, *args, **kwargs)
    monkeypatch.setattr(F, "linear", spy)
    return seen


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_vit_linear_gets_contiguous_inputs_and_the_map_is_bf16s(monkeypatch, precision):
    model, x = _vit(), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with salience.performance(precision="fp32"):
        reference = salience.vanilla(model, x, 1)
    with monkeypatch.context() as m, salience.performance(precision=precision):
        m.setattr(perf, "holds_attention", lambda model: False)  # salience's bf16 pass as it was
        unpatched_inputs = _linear_inputs(m)
        unpatched = salience.vanilla(model, x, 1)
    with monkeypatch.context() as m, salience.performance(precision=precision):
        inputs = _linear_inputs(m)
        fixed = salience.vanilla(model, x, 1)
    assert (3, False) in unpatched_inputs  # the strided view, as torch makes it
    assert inputs and all(contiguous for dim, contiguous in inputs if dim >= 3)
    assert fixed.shape == reference.shape and torch.isfinite(fixed).all() and fixed.abs().sum() > 0
    # a layout change, not a rounding: the map is bf16's (kernels may sum in another order), and fp32's within bf16
    assert torch.allclose(fixed, unpatched, rtol=0, atol=1e-3 * unpatched.abs().max())
    assert (fixed - reference).norm() / reference.norm() < 0.05
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks and all(p.requires_grad for p in model.parameters())


def test_mode_keeps_self_attention_one_tensor_and_gradients_flow():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.rand(2, 5, 8).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # as a ViT's tokens
    seen = []
    real = F.linear
    try:
        F.linear = lambda t, *a, **k: seen.append(t.is_contiguous()) or real(t, *a, **k)
        with torch.autocast("cpu", torch.bfloat16), ContiguousAttention():
            out = mha(x, x, x, need_weights=False)[0]
    finally:
        F.linear = real
    assert seen == [True, True]  # one packed in-projection (query is key is value kept), the out-projection
    (g,) = torch.autograd.grad(out.float().sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0


def test_no_mode_for_a_model_without_attention():
    stacks = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            stacks.append([type(m) for m in _get_current_function_mode_stack()])
            return self.fc(self.conv(x).mean((2, 3)))
    with salience.performance(precision="bf16"):
        salience.vanilla(Net().eval(), torch.rand(2, 3, 8, 8), 1)
    assert stacks and not any(ContiguousAttention in s for s in stacks)
