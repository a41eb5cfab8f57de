"""Attention rollout's and transformer attribution's per-call work (session 36, issue 13): the model's modules
walked once per call for the input's dtype check, the TorchScript check and the token layout (no cache across
calls: whatever changed on the model between two calls is seen by the next), and rollout's layers fused all at
once after the pass (the heads fused per layer as each attention is formed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

from conftest import unchanged
from test_transformer import ref_attribution, ref_rollout, tiny_by_hand
from tiny_vit import Block, TinyViT


def _mixed_heads() -> TinyViT:
    """A TinyViT whose three layers have 2, 4 and 1 heads (the mean divides each layer by its own count)."""
    torch.manual_seed(3)
    model = TinyViT(size=(24, 32), dim=16, heads=2, depth=3)
    model.blocks[1], model.blocks[2] = Block(16, 4), Block(16, 1)
    return model.eval()


@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.0), ("min", 0.3), ("mean", 0.8)])
def test_rollout_fuses_layers_of_different_head_counts_as_the_reference(fusion, discard):
    model = _mixed_heads()
    torch.manual_seed(4)
    x = torch.rand(3, 3, 24, 32)
    _, atts = tiny_by_hand(model, x)
    assert [a.shape[1] for a in atts] == [2, 4, 1]
    ref = ref_rollout([a.detach() for a in atts], 1, (3, 4), (24, 32), fusion, discard)
    with unchanged(model):
        m = salience.attention_rollout(model, x, head_fusion=fusion, discard_ratio=discard)
    torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6)


def test_one_layer_rolls_out_to_its_own_fused_row():
    torch.manual_seed(5)
    model = TinyViT(size=(16, 24), dim=8, heads=2, depth=1).eval()
    x = torch.rand(2, 3, 16, 24)
    _, atts = tiny_by_hand(model, x)
    ref = ref_rollout([a.detach() for a in atts], 1, (2, 3), (16, 24), "max", 0.5)
    torch.testing.assert_close(salience.attention_rollout(model, x, head_fusion="max", discard_ratio=0.5), ref,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["attention_rollout", "transformer_attribution"])
def test_a_model_changed_between_calls_is_checked_afresh(method):
    """Each call walks the model again: model.double() between two calls refuses a float32 input and takes a
    float64 one; a submodule replaced by its TorchScript is refused by name; a patch embedding replaced by one
    with larger patches gives the new grid (and, for attribution, the reference's map)."""
    fn = getattr(salience, method)
    torch.manual_seed(6)
    model = TinyViT(size=(16, 32), dim=8, heads=2, depth=2).eval()
    x = torch.rand(1, 3, 16, 32)
    assert fn(model, x, upsample=False).shape == (1, 2, 4)
    model.double()
    with pytest.raises(SalienceError, match="x is torch.float32 but the model computes in torch.float64"):
        fn(model, x)
    assert fn(model, x.double(), upsample=False).dtype == torch.float64
    model.float()
    scripted = torch.jit.script(model.blocks[1].mlp)
    kept, model.blocks[1].mlp = model.blocks[1].mlp, scripted
    with pytest.raises(SalienceError, match="'blocks.1.mlp' is a torch.jit.ScriptModule"):
        fn(model, x)
    model.blocks[1].mlp = kept
    model.embed = nn.Conv2d(3, 8, 16, stride=16)  # 1x2 patches of 16 px: 1 + 2 tokens, the positions cut to fit
    model.pos = nn.Parameter(model.pos[:, :3].detach().clone())
    m = fn(model, x, upsample=False)
    assert m.shape == (1, 1, 2)
    if method == "transformer_attribution":
        target = int(model(x).argmax())
        ref = ref_attribution(tiny_by_hand, model, x, [target], 1, (1, 2))
        torch.testing.assert_close(fn(model, x, target), ref, rtol=1e-5, atol=1e-6)


def test_a_model_that_is_no_module_is_refused_after_the_input():
    with pytest.raises(SalienceError, match="expected x as a torch.Tensor"):
        salience.attention_rollout(object(), "not a tensor")  # type: ignore[arg-type]
    with pytest.raises(SalienceError, match="expected a torch.nn.Module as the model"):
        salience.attention_rollout(object(), torch.rand(1, 3, 8, 8))  # type: ignore[arg-type]
