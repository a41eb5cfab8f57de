"""Attention rollout's and transformer attribution's per-call work (session 36, issue 13): the model's modules
walked once per call for the input's dtype check, the TorchScript check and the token layout (no cache across
calls: whatever changed on the model between two calls is seen by the next), and rollout's layers fused all at
once after the pass (the heads fused per layer as each attention is formed)."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import salience
from salience import SalienceError
from salience.methods import transformer

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


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of the CPU storages the ops in the block make, each counted until its last tensor dies."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def _gone(self, ptr: int) -> None:
        self.refs[ptr][0] -= 1
        if not self.refs[ptr][0]:
            self.now -= self.refs.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.refs:
                    self.refs[ptr] = [0, t.untyped_storage().nbytes()]
                    self.now += self.refs[ptr][1]
                    self.peak = max(self.peak, self.now)
                self.refs[ptr][0] += 1
                weakref.finalize(t, self._gone, ptr)
        return out


def test_rollout_discard_adds_one_run_of_layers_at_a_time_to_the_peak(monkeypatch):
    """discard_ratio's topk values, indices and mask (~13 bytes an element at 0.9) for one run of layers at a time,
    not for all the layers at once: with runs of one layer, the call's peak with discard_ratio=0.9 is within two
    layers' worth of that of discard_ratio=0 (stacking all 12 layers added 12 layers' worth: vit_b_16 at 64 images,
    0.5 GB)."""
    monkeypatch.setattr(transformer, "_CHUNK", 1, raising=False)
    torch.manual_seed(7)
    model = TinyViT(size=(64, 64), dim=8, heads=1, depth=12).eval()
    x = torch.rand(4, 3, 64, 64)
    peaks = []
    for discard in (0.0, 0.9):
        with _LiveBytes() as live:
            salience.attention_rollout(model, x, discard_ratio=discard)
        peaks.append(live.peak)
    n = 1 + (64 // 8) ** 2
    layer = x.shape[0] * n * n * 12  # one layer's topk values and indices, and mask, at 0.9
    assert peaks[1] <= peaks[0] + 2 * layer, (peaks, layer)


@pytest.mark.parametrize("chunk", [1, 2 * 3 * 13 * 13])
def test_rollout_in_runs_of_layers_is_bit_equal_to_all_layers_at_once(monkeypatch, chunk):
    """Runs of one layer, and of 2 layers with a third left over: the same map, bit for bit, as all at once."""
    model = _mixed_heads()
    x = torch.rand(3, 3, 24, 32)
    whole = salience.attention_rollout(model, x, discard_ratio=0.5)
    monkeypatch.setattr(transformer, "_CHUNK", chunk)
    assert torch.equal(salience.attention_rollout(model, x, discard_ratio=0.5), whole)
