"""Attention capture (salience.attention), attention rollout and transformer attribution, against
hand-written references that compute every attention matrix explicitly from the modules' weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError
from salience.attention import AttentionCapture, attention_maps

from conftest import SmallCNN, unchanged
from hand_cams import assert_each_varies
from tiny_vit import TinyViT, torchvision_vit

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import SwinTransformer  # noqa: E402


@pytest.fixture(scope="module")
def vit():
    return torchvision_vit()


@pytest.fixture(scope="module")
def x32():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)


def explicit_attention(mha: nn.MultiheadAttention, h: torch.Tensor, atts: list) -> torch.Tensor:
    """Self-attention of batch-first tokens ``h`` (B, N, D) written out from the module's weights;
    the attention matrix (B, heads, N, N) is appended to ``atts`` (with its gradient kept)."""
    b, n, d = h.shape
    heads = mha.num_heads
    q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
    if a.requires_grad:
        a.retain_grad()
    atts.append(a)
    return mha.out_proj((a @ v).transpose(1, 2).reshape(b, n, d))


def vit_by_hand(vit, x):
    """torchvision's ViT forward, its attention explicit: (output (B, classes), attentions)."""
    atts: list = []
    t = vit._process_input(x)
    t = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), t], dim=1) + vit.encoder.pos_embedding
    for blk in vit.encoder.layers:
        t = t + explicit_attention(blk.self_attention, blk.ln_1(t), atts)
        t = t + blk.mlp(blk.ln_2(t))
    return vit.heads(vit.encoder.ln(t)[:, 0]), atts


def tiny_by_hand(model, x):
    """TinyViT's forward, its attention explicit."""
    atts: list = []
    t = model.embed(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.prefix.expand(x.shape[0], -1, -1), t], dim=1) + model.pos
    for blk in model.blocks:
        t = t + explicit_attention(blk.attn.mha, blk.norm1(t), atts)
        t = t + blk.mlp(blk.norm2(t))
    return model.head(model.norm(t)[:, 0]), atts


def ref_rollout(atts, prefix, grid, size, fusion="mean", discard=0.0):
    """Abnar & Zuidema's rollout, one image at a time, in the reference implementation's steps."""
    maps = []
    for b in range(atts[0].shape[0]):
        n = atts[0].shape[-1]
        result = torch.eye(n)
        for a in atts:
            f = {"mean": a[b].mean(0), "max": a[b].max(0).values, "min": a[b].min(0).values}[fusion]
            flat = f.flatten().clone()
            idx = flat.argsort()[:int(flat.numel() * discard)]
            flat[idx[idx != 0]] = 0
            a2 = (flat.view(n, n) + torch.eye(n)) / 2
            result = (a2 / a2.sum(dim=-1, keepdim=True)) @ result
        maps.append(result[0, prefix:].reshape(grid))
    m = torch.stack(maps)
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def ref_attribution(by_hand, model, x, target, prefix, grid):
    """Chefer et al. 2021 written out: R = I; R += mean_h(ReLU(grad_A * A)) R per layer; class token's row."""
    out, atts = by_hand(model, x.clone().requires_grad_(True))
    out[torch.arange(len(x)), target].sum().backward()
    n = atts[0].shape[-1]
    r = torch.eye(n).expand(len(x), n, n)
    for a in atts:
        r = r + (a.grad * a).clamp(min=0).mean(1) @ r
    m = r[:, 0, prefix:].reshape(len(x), *grid)
    return F.interpolate(m[:, None].detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


# --- attention capture ------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [True, False], ids=["python-attention", "native-kernel-no-grad"])
def test_capture_sees_torchvision_vit_attention_exactly(vit, x32, grad, monkeypatch):
    """With autograd the capture runs its Python attention; without (rollout), PyTorch's C++ kernel
    asked for the weights. Both give the hand-written attention and the model's own output."""
    native, calls = torch._native_multi_head_attention, []
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a: calls.append(1) or native(*a))
    out_ref, atts = vit_by_hand(vit, x32)
    torch.testing.assert_close(out_ref, vit(x32), rtol=1e-5, atol=1e-5)
    with unchanged(vit):
        with AttentionCapture(batch=2) as cap, torch.set_grad_enabled(grad):
            out = vit(x32)
    assert out.requires_grad == grad and len(calls) == (0 if grad else 2)
    assert cap.kinds == ["mha", "mha"]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(cap.maps, atts):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"attn_mask": "bool"}, {"attn_mask": "float"},
                                {"scale": 0.3}, {"gqa": True}])
def test_capture_of_sdpa_equals_the_fused_kernel(kw):
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(6, 6) > 0.3
        kw["attn_mask"][:, 0] = True  # no fully masked row
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(2, 1, 6, 6)
    if kw.pop("gqa", False):
        k, v, kw["enable_gqa"] = k[:, :2], v[:, :2], True
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    with AttentionCapture() as cap:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cap.kinds == ["sdpa"] and cap.maps[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(cap.maps[0].sum(-1), torch.ones(2, 4, 6))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])  # no grad, no mask: the C++ kernel
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "attn", "both", "per_head"])
def test_capture_of_multihead_attention_keeps_its_outputs_and_masks(need_weights, masks, grad):
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(8, 2).eval()
    q = torch.randn(5, 3, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    kw = {"none": {}, "padding": {"key_padding_mask": pad}, "attn": {"attn_mask": torch.randn(5, 5)},
          "both": {"attn_mask": torch.rand(5, 5) > 0.7, "key_padding_mask": pad},
          "per_head": {"attn_mask": torch.randn(6, 5, 5)}}[masks]
    with torch.set_grad_enabled(grad):
        ref, ref_w = mha(q, q, q, need_weights=need_weights, average_attn_weights=False, **kw)
        with AttentionCapture() as cap:  # batch_first=False: the kernel gets a transposed view
            out, w = mha(q, q, q, need_weights=need_weights, average_attn_weights=False, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (w is None) == (ref_w is None) and cap.kinds == ["mha"]
    if w is not None:
        torch.testing.assert_close(w, ref_w)
        # with gradients the matrix itself (its graph); without, a copy, which the model's later in-place changes of
        # the weights it got do not reach (session 43, tests/test_s43_capture_inplace.py)
        assert (w is cap.maps[0]) == grad and torch.equal(w, cap.maps[0])


def test_capture_gradient_reaches_the_recorded_matrix(vit, x32):
    """The recorded A is the tensor the output is computed from: its gradient is the hand-written one."""
    out_ref, atts = vit_by_hand(vit, x32.clone().requires_grad_(True))
    out_ref[:, 3].sum().backward()
    cap = AttentionCapture(batch=2, grads=True)
    xg = x32.clone().requires_grad_(True)
    with cap:
        out = vit(xg)
    torch.autograd.grad(out[:, 3].sum(), xg)  # as the engine does: the hooks on A keep its gradient
    assert [len(gs) for gs in cap.grads] == [1, 1]
    for gs, a in zip(cap.grads, atts):
        torch.testing.assert_close(gs[0], a.grad, rtol=1e-4, atol=1e-6)


def test_capture_reduces_each_matrix_as_it_is_formed(vit, x32):
    """``reduce=``: each A handed over once, in call order, and only what it returns kept."""
    _, atts = vit_by_hand(vit, x32)
    seen: list = []
    fused = attention_maps(vit, x32, reduce=lambda a: seen.append(a.shape) or a.amax(1))
    assert seen == [(2, 2, 17, 17)] * 2 and [f.shape for f in fused] == [(2, 17, 17)] * 2
    for f, a in zip(fused, atts):
        torch.testing.assert_close(f, a.detach().amax(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grads=True"):
        AttentionCapture(grads=True, reduce=lambda a: a)


# --- attention rollout ------------------------------------------------------------------------

@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
def test_rollout_equals_reference_on_torchvision_vit(vit, x32, fusion, discard):
    _, atts = vit_by_hand(vit, x32)
    ref = ref_rollout([a.detach() for a in atts], 1, (4, 4), (32, 32), fusion, discard)
    with unchanged(vit):
        m = salience.attention_rollout(vit, x32, head_fusion=fusion, discard_ratio=discard)
    assert m.shape == (2, 32, 32)
    assert_each_varies(m)
    torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6)


def test_rollout_and_attribution_are_the_same_whatever_the_attention_kernel():
    torch.manual_seed(7)
    model = TinyViT(size=(24, 40), prefix=2).eval()
    x = torch.rand(2, 3, 24, 40)
    _, atts = tiny_by_hand(model, x)
    ref_roll = ref_rollout([a.detach() for a in atts], 2, (3, 5), (24, 40))
    ref_attr = ref_attribution(tiny_by_hand, model, x, torch.tensor([1, 3]), 2, (3, 5))
    for mode in ("mha", "sdpa", "explicit"):
        model.set_attention(mode)
        with unchanged(model):
            roll = salience.attention_rollout(model, x)
            attr = salience.transformer_attribution(model, x, torch.tensor([1, 3]))
        assert_each_varies(ref_roll)
        assert_each_varies(ref_attr)
        torch.testing.assert_close(roll, ref_roll, rtol=1e-5, atol=1e-6, msg=mode)
        torch.testing.assert_close(attr, ref_attr, rtol=1e-4, atol=1e-6, msg=mode)
        assert_each_varies(attr)
    model.set_attention("mha")


def test_rollout_ignores_the_target_and_repeats_for_several(vit, x32):
    one = salience.attention_rollout(vit, x32)
    assert not one.is_inference()  # computed under inference mode, handed back as a normal tensor
    assert not salience.attention_rollout(vit, x32, upsample=False).is_inference()
    torch.testing.assert_close(salience.attention_rollout(vit, x32, 3), one)
    several = salience.attention_rollout(vit, x32, torch.tensor([[0, 1, 2], [3, 4, 0]]))
    assert several.shape == (2, 3, 32, 32)
    for k in range(3):
        torch.testing.assert_close(several[:, k], one)
    assert salience.attention_rollout(vit, x32, upsample=False).shape == (2, 4, 4)


# A wrong target: the rollout does not depend on it, but it is refused with the error every other
# method gives (transformer_attribution's, word for word). The tiny ViT has 5 outputs; the batch is 2.
WRONG_TARGETS = {
    "out of range": (5000, r"^target class 5000 is out of range for a model with 5 outputs \(valid: 0\.\.4\)$"),
    "negative": (-2, r"^target class -2 is out of range for a model with 5 outputs"),
    "per image out of range": (torch.tensor([1, 5]), r"^target class 5 is out of range"),
    "one of K out of range": (torch.tensor([[0, 1], [2, 9]]), r"^target class 9 is out of range"),
    "class set out of range": (salience.targets.multilabel([1, 7]), r"^target class 7 is out of range"),
    "per image, wrong length": ([0, 1, 2], r"^got 3 target classes for a batch of 2 images"),
    "K per image, wrong length": (torch.tensor([[0, 1], [1, 2], [2, 3]]), r"B = 2 \(the batch\)"),
}


@pytest.mark.parametrize("case", list(WRONG_TARGETS))
def test_rollout_refuses_a_wrong_target_as_attribution_does(case, vit, x32):
    target, words = WRONG_TARGETS[case]
    with pytest.raises(SalienceError, match=words) as ref:
        salience.transformer_attribution(vit, x32, target)
    for fn in (salience.attention_rollout, salience.METHODS["attention_rollout"]):
        with unchanged(vit), pytest.raises(SalienceError) as got:
            fn(vit, x32, target)
        assert str(got.value) == str(ref.value)


def test_rollout_checks_the_target_on_the_output_of_its_one_pass(vit, x32):
    """A valid target gives the map of no target, from one forward pass (the output it is checked
    against is that pass's); a function of the output is not called."""
    one = salience.attention_rollout(vit, x32)
    calls = []
    handle = vit.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        for target in (4, torch.tensor([0, 4]), salience.targets.multilabel([0, 3]), salience.targets.predicted(),
                       lambda out: out[:, 9]):
            calls.clear()
            with unchanged(vit):
                torch.testing.assert_close(salience.METHODS["attention_rollout"](vit, x32, target), one,
                                           rtol=0, atol=0)
            assert len(calls) == 1
    finally:
        handle.remove()


# --- transformer attribution ------------------------------------------------------------------

def test_attribution_equals_reference_on_torchvision_vit(vit, x32):
    target = torch.tensor([2, 0])
    with unchanged(vit):
        m = salience.transformer_attribution(vit, x32, target)
    ref = ref_attribution(vit_by_hand, vit, x32, target, 1, (4, 4))
    assert m.shape == (2, 32, 32)
    assert_each_varies(ref)
    torch.testing.assert_close(m, ref, rtol=1e-4, atol=1e-6)
    pred = vit(x32).argmax(1)
    ref_pred = ref_attribution(vit_by_hand, vit, x32, pred, 1, (4, 4))
    assert_each_varies(ref_pred)
    torch.testing.assert_close(salience.transformer_attribution(vit, x32), ref_pred, rtol=1e-4, atol=1e-6)


def test_several_targets_are_separate_calls_from_one_forward(vit, x32):
    calls = []
    handle = vit.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        several = salience.transformer_attribution(vit, x32, torch.tensor([[0, 1, 2], [3, 4, 0]]))
        assert len(calls) == 1
        calls.clear()
        salience.attention_rollout(vit, x32, torch.tensor([[0, 1], [3, 4]]))
        assert len(calls) == 1
    finally:
        handle.remove()
    assert several.shape == (2, 3, 32, 32)
    for k, t in enumerate(([0, 3], [1, 4], [2, 0])):
        torch.testing.assert_close(several[:, k], salience.transformer_attribution(vit, x32, torch.tensor(t)),
                                   rtol=1e-5, atol=1e-7)
    assert not torch.allclose(several[:, 0], several[:, 1])


# --- errors and the model left as it was ------------------------------------------------------

def test_errors_say_what_to_do(vit, x32):
    cnn = SmallCNN().eval()
    for method in (salience.attention_rollout, salience.transformer_attribution):
        with unchanged(cnn):
            with pytest.raises(SalienceError, match="saw no attention operation.*use gradcam"):
                method(cnn, x32)
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=5).eval()
    with pytest.raises(SalienceError, match="Windowed attention"):
        salience.attention_rollout(swin, x32)
    with unchanged(vit):
        with pytest.raises(SalienceError, match="head_fusion must be one of"):
            salience.attention_rollout(vit, x32, head_fusion="median")
        with pytest.raises(SalienceError, match=r"discard_ratio must be a number in \[0, 1\)"):
            salience.attention_rollout(vit, x32, discard_ratio=1.0)
        with pytest.raises(SalienceError, match="grid"):
            salience.transformer_attribution(vit, x32, grid=(5, 5))
        with pytest.raises(SalienceError, match="out of range"):
            salience.transformer_attribution(vit, x32, 9)
    no_cls = TinyViT(size=(16, 16), prefix=0).eval()
    with pytest.raises(SalienceError, match="pass prefix_tokens=1"):
        salience.attention_rollout(no_cls, torch.rand(1, 3, 16, 16))


class Broken(nn.Module):
    """Attention, then an error (or Ctrl-C) in the middle of the forward pass."""

    def __init__(self, exc: BaseException):
        super().__init__()
        self.vit = TinyViT(size=(16, 16)).train()
        self.exc = exc

    def forward(self, x):
        self.vit(x)
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_model_unchanged_after_an_exception_inside_the_capture(exc):
    model = Broken(exc)
    for method in (salience.attention_rollout, salience.transformer_attribution):
        with unchanged(model):
            with pytest.raises(type(exc)):
                method(model, torch.rand(1, 3, 16, 16), 0)
    with unchanged(model):
        with pytest.raises(type(exc)):
            attention_maps(model, torch.rand(1, 3, 16, 16), reduce=lambda a: a.sum(1))
    assert model.training and model.vit.blocks[0].attn.mha.training


@pytest.mark.parametrize("name", ["gradcam", "eigencam", "scorecam", "attention_rollout", "transformer_attribution"])
def test_a_grid_given_as_width_by_height_is_refused(name):
    """On a 24x40 input with 8-pixel patches the patch grid is 3 rows by 5 columns; grid=(5, 3) has
    the same 15 cells, so the tokens fit it, and the map came back scrambled (rows read as columns)
    with no word. Now it is a SalienceError giving (3, 5); the right grid gives the default map."""
    model = TinyViT(size=(24, 40)).eval()
    x = torch.rand(2, 3, 24, 40)
    fn = salience.METHODS[name]
    with unchanged(model), pytest.raises(SalienceError, match=r"grid=\(5, 3\).*3x5.*grid=\(3, 5\)"):
        fn(model, x, 0, grid=(5, 3))
    torch.testing.assert_close(fn(model, x, 0, grid=(3, 5)), fn(model, x, 0))


@pytest.mark.parametrize("name", ["gradcam", "eigencam", "attention_rollout"])
def test_a_grid_that_contradicts_the_patch_embedding_needs_prefix_tokens(name):
    """On a 24x40 input with 8-pixel patches the layer gives 1 + 3 * 5 = 16 tokens. grid=(2, 2) fits
    them too, with 16 - 4 = 12 'prefix tokens': accepted with no word before, a map of 4 of the
    patches. Now ambiguous unless prefix_tokens says so; with it, the user's reading is taken."""
    model = TinyViT(size=(24, 40)).eval()
    x = torch.rand(1, 3, 24, 40)
    fn = salience.METHODS[name]
    with unchanged(model), pytest.raises(SalienceError, match=r"grid=\(2, 2\) reads 12 .* 3x5 .* reads 1: .*"
                                                                r"prefix_tokens=12"):
        fn(model, x, 0, grid=(2, 2))
    assert fn(model, x, 0, grid=(2, 2), prefix_tokens=12).shape == (1, 24, 40)
    torch.testing.assert_close(fn(model, x, 0, grid=(3, 5), prefix_tokens=1), fn(model, x, 0))


def _checkpointed_vits() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A small timm ViT after ``set_grad_checkpointing()``, its twin without it (the same weights), an input."""
    import timm

    torch.manual_seed(0)
    kw = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    plain = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    net = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    net.load_state_dict(plain.state_dict())
    net.set_grad_checkpointing(True)
    return net, plain, torch.rand(2, 3, 32, 32)


@pytest.mark.parametrize("reentrant", [True, False])
def test_attention_methods_through_a_checkpoint_are_the_plain_models(reentrant):
    """timm's ViT after ``set_grad_checkpointing()`` runs its blocks in ``torch.utils.checkpoint`` (non-reentrant by
    default, reentrant after ``timm.layers.set_reentrant_ckpt(True)``). Transformer attribution through a
    non-reentrant one was refused (a SalienceError: the backward pass recomputed the blocks without the attention
    capture, so torch found other values than the forward pass saved). Salience's passes now run both kinds as plain
    calls: transformer attribution and attention rollout are the maps of the same weights without checkpointing (the
    reentrant case was already so: checked alongside), the model comes back as it was, and torch's checkpoint with
    it."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
    from torch.utils import checkpoint as ck

    from salience._core.checkpoints import _NON_REENTRANT

    torch_own = [getattr(ck, name, None) for name in _NON_REENTRANT]
    net, plain, x = _checkpointed_vits()
    target = torch.tensor([1, 3])
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        with unchanged(net):
            ta = salience.transformer_attribution(net, x, target)
            rollout = salience.attention_rollout(net, x)
    finally:
        set_reentrant_ckpt(before)
    ref = salience.transformer_attribution(plain, x, target)
    assert_each_varies(ref)
    torch.testing.assert_close(ta, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rollout, salience.attention_rollout(plain, x), rtol=1e-5, atol=1e-7)
    assert "apply" not in ck.CheckpointFunction.__dict__
    assert [getattr(ck, name, None) for name in _NON_REENTRANT] == torch_own


def test_transformer_attribution_through_a_non_reentrant_checkpoint_torch_keeps_is_a_salience_error(monkeypatch):
    """A non-reentrant checkpoint salience cannot run plainly (a torch whose private set-up function has another
    name: here none is swapped) recomputes the block in the backward pass without the attention capture (its explicit
    weights in place of the fused attention), and torch failed with its ``CheckpointError`` ('Recomputed values ...
    have different metadata'). One SalienceError line says to turn the checkpointing off; the model comes back as it
    was."""
    from timm.layers import use_reentrant_ckpt

    monkeypatch.setattr("salience._core.checkpoints._NON_REENTRANT", ())
    net, _, x = _checkpointed_vits()
    assert not use_reentrant_ckpt()  # timm's default: non-reentrant
    with unchanged(net), pytest.raises(salience.SalienceError, match="checkpoint"):
        salience.transformer_attribution(net, x, 1)
