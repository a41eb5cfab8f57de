"""``AttentionCapture`` by hand (session 43): a model that changes its attention matrix in place after the layer formed
it (``attn.mul_(...)``, a masked fill after the product) left the capture holding the changed values under
``torch.no_grad()`` (only ``torch.inference_mode()`` kept a copy). The capture now gives the matrix as the layer
returned it in every pass without gradients, and refuses to give a changed one where it keeps the matrix itself (a pass
with gradients)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from salience._core.errors import SalienceError
from salience.attention import AttentionCapture


class _Attend(nn.Module):
    """The layer: ``softmax(q k^T / 2)``, the attention matrix ``(B, heads, L, S)``."""

    def forward(self, q, k):
        return (q @ k.transpose(-2, -1) / 2).softmax(-1)


class _ChangesItLater(nn.Module):
    """Attention, its product with the values, then the matrix zeroed in place (after the layer returned it)."""

    def __init__(self):
        super().__init__()
        self.attend = _Attend()

    def forward(self, x):
        a = self.attend(x, x)
        out = a @ x
        a.mul_(0)
        return out


class _HeadWeights(nn.Module):
    """``nn.MultiheadAttention`` returning its per-head weights, which the model then masks in place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        out, w = self.mha(x, x, x, need_weights=True, average_attn_weights=False)
        w.masked_fill_(torch.ones_like(w, dtype=torch.bool), 0.0)
        return out


def _x():
    return torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(0))


PASSES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad, nothing to differentiate":
          contextlib.nullcontext}


@pytest.mark.parametrize("mode", list(PASSES))
def test_the_capture_gives_the_matrix_as_the_layer_returned_it(mode):
    x = _x()
    formed = (x @ x.transpose(-2, -1) / 2).softmax(-1)
    with PASSES[mode](), AttentionCapture() as cap:
        _ChangesItLater()(x)
    assert cap.kinds == ["softmax"]
    assert torch.equal(cap.maps[0], formed)  # under no_grad: zeros (the model's later mul_)


@pytest.mark.parametrize("reduce", [None, lambda a: a[:, 0]], ids=["matrix", "a view reduce returned"])
def test_a_view_that_reduce_returns_is_kept_as_formed_too(reduce):
    x = _x()
    formed = (x @ x.transpose(-2, -1) / 2).softmax(-1)
    with torch.no_grad(), AttentionCapture(reduce=reduce) as cap:
        _ChangesItLater()(x)
    assert torch.equal(cap.maps[0], formed if reduce is None else formed[:, 0])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_multihead_attention_weights_masked_in_place_after(mode):
    model, x = _HeadWeights().eval(), torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, formed = model.mha(x, x, x, need_weights=True, average_attn_weights=False)
    with PASSES[mode](), AttentionCapture() as cap:
        model(x)
    assert cap.kinds == ["mha"] and float(formed.abs().sum()) > 0
    torch.testing.assert_close(cap.maps[0], formed)


def test_with_gradients_a_changed_matrix_is_refused_not_given():
    x = _x().requires_grad_()
    with AttentionCapture() as cap:
        _ChangesItLater()(x)
    with pytest.raises(SalienceError, match=r"changed attention matrix 0 \(softmax\) in place.*torch\.no_grad\(\)"):
        cap.maps
    with AttentionCapture() as unchanged:  # a matrix the model leaves alone: the tensor itself, with its graph
        a = _Attend()(x, x)
        (a @ x).sum()
    assert unchanged.maps[0] is a and unchanged.maps[0].requires_grad
