"""Review of merge 36161db (attention rollout, transformer attribution and class_model's steps under the performance
settings): ``precision="fp16"`` now reaches their passes, and a pass that overflows float16 (magnitudes past 65504)
gave a NaN map (or a misleading "diverged" error) without naming the cause; they are refused as the guided and CAM
passes' are (``methods._multi.refuse_fp16_overflow``), bf16 (float32's range) giving finite results."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

from tiny_vit import TinyViT

FP16 = r"overflow float16 under precision='fp16'.*'bf16'"


class _GradOverflowViT(TinyViT):
    """Finite scores whose gradients overflow float16: ``(z * 1e-6) * 1e5`` has the gradient 1e5 at ``z * 1e-6``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (super().forward(x) * 1e-6) * 1e5


def _vit(cls: type, mode: str) -> TinyViT:
    torch.manual_seed(0)
    return cls(size=(16, 16), patch=4, dim=16, heads=2, depth=2).eval().set_attention(mode)


@pytest.mark.parametrize("mode", ["mha", "sdpa", "explicit"])
def test_transformer_attribution_gradients_that_overflow_float16_are_refused(mode):
    """The attention's gradients past 65504 under fp16 made the map NaN / infinite, without a word (before the merge
    the method ran in float32: a finite map)."""
    v, x = _vit(_GradOverflowViT, mode), torch.rand(2, 3, 16, 16)
    assert torch.isfinite(salience.transformer_attribution(v, x, 1)).all()
    with salience.performance(precision="fp16"):
        with pytest.raises(SalienceError, match=FP16):
            salience.transformer_attribution(v, x, 1)
    with salience.performance(precision="bf16"):
        assert torch.isfinite(salience.transformer_attribution(v, x, [1, 2])).all()


@pytest.mark.parametrize("mode", ["mha", "sdpa", "explicit"])
def test_attention_rollout_attention_that_overflows_float16_is_refused(mode):
    """Queries and keys scaled by 300: the logits ``q k^T`` pass 65504 under fp16 (inf - inf in the softmax: NaN attention),
    and the rollout came back NaN without a word; in float32 (and bf16) the attention is finite."""
    v, x = _vit(TinyViT, mode), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for block in v.blocks:
            block.attn.mha.in_proj_weight[:32].mul_(300)  # the queries' and keys' rows
    assert torch.isfinite(salience.attention_rollout(v, x)).all()
    with salience.performance(precision="fp16"):
        with pytest.raises(SalienceError, match=r"attention matrices " + FP16):
            salience.attention_rollout(v, x)
    with salience.performance(precision="bf16"):
        assert torch.isfinite(salience.attention_rollout(v, x)).all()


class _GradOverflowCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.f(x).mean((2, 3))) * 1e-6) * 1e5


def test_class_model_gradients_that_overflow_float16_are_refused_not_called_divergence():
    """class_model's steps under fp16 with gradients past 65504: "class_model diverged at step 1 ...; lower lr, raise
    l2, or use optimizer='adam'" (already Adam, and no lr helps): the cause is the precision, and it is said."""
    m = _GradOverflowCNN().eval()
    assert torch.isfinite(salience.class_model(m, 1, shape=(3, 8, 8), steps=3)).all()
    with salience.performance(precision="fp16"):
        with pytest.raises(SalienceError, match=FP16):
            salience.class_model(m, 1, shape=(3, 8, 8), steps=3)
    with salience.performance(precision="bf16"):
        assert torch.isfinite(salience.class_model(m, 1, shape=(3, 8, 8), steps=3)).all()


def test_smoothgrad_of_transformer_attribution_refuses_the_fp16_overflow_at_the_end_of_the_call():
    """Inside a many-pass call (SmoothGrad's chunks) the test is deferred to the call's end: NaN maps before
    (``chunk`` given: no memory probe, seconds on a first call)."""
    v, x = _vit(_GradOverflowViT, "mha"), torch.rand(2, 3, 16, 16)

    def call(**options):
        return salience.smoothgrad(v, x, 1, method=salience.transformer_attribution, samples=2, chunk=4, **options)

    assert torch.isfinite(call()).all()
    with pytest.raises(SalienceError, match=FP16):
        call(precision="fp16")


class _ForwardOverflowCNN(_GradOverflowCNN):
    """Scores near 1e6 (``scale`` times the head's, shifted): past 65504, infinite under fp16, where float32's are
    finite (``scale=1e39``: infinite in every precision)."""

    def __init__(self, scale: float = 1e5) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.f(x).mean((2, 3))) + 10) * self.scale


def test_a_score_that_overflows_float16_names_the_precision():
    """The merge ran class_model's steps and transformer attribution under fp16: a forward pass past 65504 was
    refused with "check torch.isfinite(model(x))", which is finite in float32: the refusal now names fp16."""
    m, v = _ForwardOverflowCNN().eval(), _vit(TinyViT, "mha")
    with torch.no_grad():
        v.head.bias.add_(1e6)
    x = torch.rand(2, 3, 16, 16)
    assert torch.isfinite(salience.class_model(m, 1, shape=(3, 8, 8), steps=2)).all()
    assert torch.isfinite(salience.transformer_attribution(v, x, 1)).all()
    with salience.performance(precision="fp16"):
        with pytest.raises(SalienceError, match=r"^the target's score is NaN or infinite .*precision='fp16'.*'bf16'"):
            salience.class_model(m, 1, shape=(3, 8, 8), steps=2)
        with pytest.raises(SalienceError, match=r"^the target's score is NaN or infinite .*precision='fp16'.*'bf16'"):
            salience.transformer_attribution(v, x, 1)
    with salience.performance(precision="bf16"):
        with pytest.raises(SalienceError, match=r"torch.isfinite\(model\(x\)\)") as other:
            salience.vanilla(_ForwardOverflowCNN(1e39).eval(), x[:, :, :8, :8], 1)
    assert "fp16" not in str(other.value)  # under another precision: said as before
