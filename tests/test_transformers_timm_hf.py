"""Transformers from timm and Hugging Face (small random configs, no download): Grad-CAM's default
layer and maps against hand-written references, the prefix tokens, guided methods refusing GELU,
SmoothGrad over token layers, attention rollout and transformer attribution whichever kernel the
model used, and every method of ``salience.METHODS`` on a Hugging Face ViT.

The default layers (see docs/methods-transformers.md):

* ViT-like (timm ViT, DeiT distilled, ViT with registers; HF ViT, DeiT): the LayerNorm before the
  last block's attention (timm ``blocks.1.norm1``, HF ``vit.layers.1.layernorm_before``): after
  the last attention only the class (and distillation) token reaches the head;
* Swin: the final norm, timm ``norm`` channels-last ``(B, h, w, C)``, HF ``swin.layernorm`` tokens
  ``(B, h * w, C)`` on the merged 8x8 grid, no prefix;
* ConvNeXt: the last stage, timm ``stages`` (the same tensor as ``stages.3``), HF
  ``convnext.encoder.stages.3``.
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

import salience
from salience import SalienceError
from salience.methods import METHODS, default_methods
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand as reference_cam

import timm  # noqa: E402 - in the test extra: tested, never skipped
import transformers  # noqa: E402
from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (ConvNextConfig, ConvNextForImageClassification, DeiTConfig,  # noqa: E402
                          DeiTForImageClassificationWithTeacher, SwinConfig, SwinForImageClassification,
                          ViTConfig, ViTForImageClassification)

transformers.logging.set_verbosity_error()
logging.getLogger("timm").setLevel(logging.ERROR)

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
HF_VIT = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
              intermediate_size=64, num_labels=3)


def _timm_vit(**kw):
    return VisionTransformer(**VIT, **kw)


def _hf_vit(impl="eager"):
    return ViTForImageClassification(ViTConfig(**HF_VIT, attn_implementation=impl))


BUILDERS = {
    "timm_vit": _timm_vit,
    "timm_deit_distilled": lambda: VisionTransformerDistilled(**VIT),
    "timm_vit_registers": lambda: _timm_vit(reg_tokens=4, no_embed_class=True),
    "timm_swin": lambda: SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2),
                                         num_heads=(2, 4), num_classes=5),
    "timm_convnext": lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5),
    "hf_vit_eager": lambda: _hf_vit("eager"),
    "hf_vit_sdpa": lambda: _hf_vit("sdpa"),
    "hf_deit_teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**HF_VIT)),
    "hf_swin": lambda: SwinForImageClassification(SwinConfig(
        image_size=64, patch_size=4, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], num_labels=3)),
    "hf_convnext": lambda: ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16, 24, 32],
                                                                         depths=[1, 1, 1, 1], num_labels=3)),
}

_BUILT: dict = {}


def model(name):
    """The model ``name`` built once per session with seed 0, in eval mode."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = BUILDERS[name]().eval()
    return _BUILT[name]


def image(name, b=2):
    torch.manual_seed(1)
    size = 64 if ("swin" in name or "convnext" in name) else 32
    return torch.rand(b, 3, size, size)


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def tokens(prefix, h, w):
    return lambda t: t[:, prefix:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 3, 1, 2)


def nchw(t):
    return t


def last_layernorm_before(net):
    """Hugging Face ViT / DeiT: the last block's ``layernorm_before`` (``vit.layers.1.layernorm_before``
    in transformers 5, ``vit.encoder.layer.1.layernorm_before`` in 4.x)."""
    return [n for n, _ in net.named_modules() if n.endswith("layernorm_before")][-1]


# name -> (default layer, its layout as describe_default_layer says it, hand-written to_grid)
DEFAULTS = {
    "timm_vit": ("blocks.1.norm1", "1 prefix token(s) + a 4x4 grid", tokens(1, 4, 4)),
    "timm_deit_distilled": ("blocks.1.norm1", "2 prefix token(s) + a 4x4 grid", tokens(2, 4, 4)),
    "timm_vit_registers": ("blocks.1.norm1", "5 prefix token(s) + a 4x4 grid", tokens(5, 4, 4)),
    "timm_swin": ("norm", "channels-last (B, h, w, K)", nhwc),
    "timm_convnext": ("stages", "(B, K, h, w)", nchw),
    "hf_vit_eager": (last_layernorm_before, "1 prefix token(s) + a 4x4 grid", tokens(1, 4, 4)),
    "hf_vit_sdpa": (last_layernorm_before, "1 prefix token(s) + a 4x4 grid", tokens(1, 4, 4)),
    "hf_deit_teacher": (last_layernorm_before, "2 prefix token(s) + a 4x4 grid", tokens(2, 4, 4)),
    "hf_swin": ("swin.layernorm", "0 prefix token(s) + a 8x8 grid", tokens(0, 8, 8)),
    "hf_convnext": ("convnext.encoder.stages.3", "(B, K, h, w)", nchw),
}


# a target per image, two classes, where each image's Grad-CAM map varies ((1, 2) elsewhere): on these, class 1's or
# class 2's map is all 0 on an image (the ReLU cuts it), and a comparison there would be 0 = 0
TARGETS = {"timm_vit_registers": (2, 3), "timm_swin": (1, 3), "hf_vit_eager": (1, 0), "hf_vit_sdpa": (1, 0),
           "hf_deit_teacher": (2, 0)}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_default_layer_and_gradcam_equal_the_reference(name):
    net, x = model(name), image(name)
    layer_name, layout, to_grid = DEFAULTS[name]
    layer_name = layer_name if isinstance(layer_name, str) else layer_name(net)
    assert default_layer(net, x) == layer_name
    assert layout in describe_default_layer(net, x)
    target = torch.tensor(TARGETS.get(name, (1, 2)))
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    layer = net.get_submodule(layer_name)
    ref = reference_cam(net, x, layer, target, to_grid)
    assert cam.shape == x.shape[:1] + x.shape[-2:]
    assert_each_varies(cam)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_timm_convnext_default_is_the_last_stage_tensor():
    """timm ConvNeXt's ``stages`` (a Sequential) outputs the very tensor of its last stage; the
    ``norm_pre`` Identity after it, which passes the same tensor on, is not picked."""
    net, x = model("timm_convnext"), image("timm_convnext")
    kept = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, o))
             for n in ("stages", "stages.3")]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    assert kept["stages"] is kept["stages.3"]


@pytest.mark.parametrize("name, prefix", [("timm_vit", 1), ("timm_deit_distilled", 2), ("timm_vit_registers", 5),
                                          ("hf_vit_eager", 1), ("hf_deit_teacher", 2)])
def test_prefix_tokens_are_inferred(name, prefix):
    """Class, distillation and register tokens: the inferred count is the model's own (timm's
    ``num_prefix_tokens``), and giving it or the grid explicitly changes nothing."""
    net, x = model(name), image(name)
    if name.startswith("timm"):
        assert net.num_prefix_tokens == prefix
    assert f"{prefix} prefix token(s) + a 4x4 grid" in describe_default_layer(net, x)
    cam = salience.gradcam(net, x, 0)
    torch.testing.assert_close(salience.gradcam(net, x, 0, prefix_tokens=prefix, grid=(4, 4)), cam, rtol=0, atol=0)
    roll = salience.attention_rollout(net, x)
    torch.testing.assert_close(salience.attention_rollout(net, x, prefix_tokens=prefix), roll, rtol=0, atol=0)


@pytest.mark.parametrize("name, layer, to_grid", [
    ("timm_swin", "layers.1", nhwc),                                   # a channels-last stage
    ("timm_convnext", "stages.3.blocks.0.norm", nhwc),                 # LayerNorm after the block's permute
    ("timm_convnext", "stages.3.blocks.0.mlp.fc1", nhwc),              # Linear on (B, h, w, C)
    ("hf_convnext", "convnext.encoder.stages.3.layers.0.layernorm", nhwc),
    ("hf_convnext", "convnext.encoder.stages.3.layers.0.pwconv1", nhwc),
    ("hf_swin", "swin.encoder.layers.1.blocks.1.layernorm_after", tokens(0, 8, 8)),
    ("hf_swin", "swin.encoder.layers.0.blocks.1.layernorm_after", tokens(0, 16, 16)),
])
def test_gradcam_on_inner_channels_last_and_token_layers(name, layer, to_grid):
    net, x = model(name), image(name)
    target = torch.tensor([2, 0])
    with unchanged(net):
        cam = salience.gradcam(net, x, target, layer=layer)
    ref = reference_cam(net, x, net.get_submodule(layer), target, to_grid)
    assert_each_varies(ref)
    # ConvNeXt's maps here are ~4e-9: an absolute 1e-6 passed any map; the tolerance is relative to the map
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert_each_varies(cam)


GUIDED = ("guided_backprop", "deconvnet", "guided_gradcam")


@pytest.mark.parametrize("name", ["timm_vit", "timm_swin", "timm_convnext", "hf_vit_eager", "hf_swin",
                                  "hf_convnext", "hf_deit_teacher"])
def test_guided_methods_refuse_gelu_unless_told_and_guided_gradcam_is_the_product(name):
    net, x = model(name), image(name)
    for method in GUIDED:
        with unchanged(net):
            with pytest.raises(SalienceError, match=r"gelu; pass unsupported='warn' \(or 'ignore'\)"):
                METHODS[method](net, x, 1)
        with pytest.warns(UserWarning, match="not defined for"):
            assert torch.isfinite(METHODS[method](net, x, 1, unsupported="warn")).all()
    with unchanged(net):
        ggc = salience.guided_gradcam(net, x, unsupported="ignore")  # the predicted class
    guided = salience.guided_backprop(net, x, unsupported="ignore", reduce=None)
    ref = (guided * salience.gradcam(net, x)[:, None]).abs().amax(1)
    assert_each_varies(ref)
    torch.testing.assert_close(ggc, ref, rtol=1e-4, atol=1e-8)
    assert ggc.abs().sum() > 0


# the targets: each image's map varies (class 1 cut image 0's map on timm_vit_registers to 0 by the ReLU)
@pytest.mark.parametrize("name, targets", [("timm_vit_registers", [2, 0]), ("timm_swin", [1, 0]),
                                           ("hf_vit_sdpa", [1, 0]), ("hf_swin", [1, 0])])
def test_smoothgrad_over_gradcam_on_token_layers_is_the_mean_over_the_noisy_copies(name, targets):
    """SmoothGrad(Grad-CAM) = the mean of Grad-CAM over the documented noise stream (seeded generator,
    one N(0, 1) draw of the batch's shape per copy, sigma = noise * (max - min) per image)."""
    net, x = model(name), image(name)
    target = torch.tensor(targets)
    with unchanged(net):
        sg = salience.smoothgrad(net, x, target, method=salience.gradcam, samples=3, noise=0.1, seed=5)
    gen = torch.Generator().manual_seed(5)
    sigma = 0.1 * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    ref = sum(salience.gradcam(net, x + sigma * torch.randn(x.shape, generator=gen), target) for _ in range(3)) / 3
    assert_each_varies(ref)
    torch.testing.assert_close(sg, ref, rtol=1e-4, atol=1e-6)
    guided = functools.partial(salience.guided_gradcam, unsupported="ignore")
    assert torch.isfinite(salience.smoothgrad(net, x, target, method=guided, samples=2)).all()


# --- attention: rollout and transformer attribution, whatever the kernel ---------------------

def ref_rollout(atts, prefix, size):
    """Abnar & Zuidema's rollout (heads averaged, A' = (A + I) / 2 renormalized), class token's row."""
    n = atts[0].shape[-1]
    r = torch.eye(n)
    for a in atts:
        a2 = (a.mean(1) + torch.eye(n)) / 2
        r = (a2 / a2.sum(-1, keepdim=True)) @ r
    g = int(round((n - prefix) ** 0.5))
    m = r[:, 0, prefix:].reshape(-1, g, g)
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def ref_attribution(atts, prefix, size):
    """Chefer et al. 2021: R = I; R += mean_h(ReLU(dS/dA * A)) R per layer; class token's row."""
    n = atts[0].shape[-1]
    r = torch.eye(n).expand(atts[0].shape[0], n, n)
    for a in atts:
        r = r + (a.grad * a).clamp(min=0).mean(1) @ r
    g = int(round((n - prefix) ** 0.5))
    m = r[:, 0, prefix:].reshape(-1, g, g).detach()
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def timm_attention_by_hand(net, x, target):
    """The model's own attention matrices: timm's explicit path (``fused_attn=False``) passes A
    through ``attn_drop`` (identity in eval); a hook keeps it with its gradient of the target's logit."""
    atts = []

    def keep(m, i, o):
        o.retain_grad()
        atts.append(o)

    for blk in net.blocks:
        blk.attn.fused_attn = False
    hooks = [blk.attn.attn_drop.register_forward_hook(keep) for blk in net.blocks]
    try:
        out = net(x.clone().requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
    out[torch.arange(len(x)), target].sum().backward()
    return atts


@pytest.mark.parametrize("name, prefix", [("timm_vit", 1), ("timm_deit_distilled", 2), ("timm_vit_registers", 5)])
def test_timm_rollout_and_attribution_are_the_same_fused_or_explicit(name, prefix):
    torch.manual_seed(0)
    net = BUILDERS[name]().eval()  # a fresh model: its Attention modules are toggled below
    x, target = image(name), torch.tensor([3, 1])
    atts = timm_attention_by_hand(net, x, target)
    ref_roll, ref_attr = ref_rollout([a.detach() for a in atts], prefix, (32, 32)), ref_attribution(atts, prefix,
                                                                                                   (32, 32))
    assert_each_varies(ref_roll)
    assert_each_varies(ref_attr)
    for fused in (True, False):
        for blk in net.blocks:
            blk.attn.fused_attn = fused
        with unchanged(net):
            roll = salience.attention_rollout(net, x)
            attr = salience.transformer_attribution(net, x, target)
        torch.testing.assert_close(roll, ref_roll, rtol=1e-5, atol=1e-6, msg=f"fused_attn={fused}")
        torch.testing.assert_close(attr, ref_attr, rtol=1e-4, atol=1e-7, msg=f"fused_attn={fused}")
        assert_each_varies(roll)
        assert_each_varies(attr)


def test_timm_fused_attention_really_runs_sdpa_and_explicit_a_softmax():
    """The two kernels are really different code: the capture records SDPA calls with
    ``fused_attn=True`` and softmax calls with ``fused_attn=False``."""
    from salience.attention import capturing

    torch.manual_seed(0)
    net, x = _timm_vit().eval(), image("timm_vit")
    kinds = []
    for fused in (True, False):
        for blk in net.blocks:
            blk.attn.fused_attn = fused
        with capturing(net, batch=2) as cap, torch.no_grad():
            net(x)
        kinds.append(cap.kinds)
    assert kinds == [["sdpa", "sdpa"], ["softmax", "softmax"]]


def test_hf_vit_rollout_and_attribution_are_the_same_eager_or_sdpa():
    """The same weights under ``attn_implementation`` "eager" (softmax then dropout) and "sdpa"
    (``scaled_dot_product_attention(..., scale=)``), against the eager model's own attentions
    (``output_attentions=True``, gradients kept)."""
    torch.manual_seed(0)
    eager, sdpa = _hf_vit("eager").eval(), _hf_vit("sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    x, target = image("hf_vit_eager"), torch.tensor([2, 0])
    out = eager(x.clone().requires_grad_(True), output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    out.logits[torch.arange(2), target].sum().backward()
    atts = list(out.attentions)
    ref_roll, ref_attr = ref_rollout([a.detach() for a in atts], 1, (32, 32)), ref_attribution(atts, 1, (32, 32))
    assert_each_varies(ref_roll)
    assert_each_varies(ref_attr)
    from salience.attention import capturing
    for net, kind in ((eager, "softmax"), (sdpa, "sdpa")):
        with capturing(net, batch=2) as cap, torch.no_grad():
            net(x)
        assert cap.kinds == [kind, kind]
        with unchanged(net):
            roll = salience.attention_rollout(net, x)
            attr = salience.transformer_attribution(net, x, target)
        torch.testing.assert_close(roll, ref_roll, rtol=1e-5, atol=1e-6, msg=kind)
        torch.testing.assert_close(attr, ref_attr, rtol=1e-4, atol=1e-7, msg=kind)
        assert_each_varies(roll)
        assert_each_varies(attr)


def test_hf_deit_with_teacher_rollout_reads_the_class_token():
    """DeiT (class + distillation token), the default kernel (SDPA), against an eager copy's own attentions."""
    # centred pixels: at this random init attention is near uniform, and on image("hf_deit_teacher") image 1's
    # rollout varied by 7e-4 of its value (constant by assert_each_varies); centred, 2e-3 on each image
    net, x = model("hf_deit_teacher"), image("hf_deit_teacher") - 0.5
    eager = DeiTForImageClassificationWithTeacher(DeiTConfig(**HF_VIT, attn_implementation="eager")).eval()
    eager.load_state_dict(net.state_dict())
    out = eager(x, output_attentions=True)
    assert len(out.attentions) == 2
    ref = ref_rollout([a.detach() for a in out.attentions], 2, (32, 32))
    assert_each_varies(ref)
    with unchanged(net):
        torch.testing.assert_close(salience.attention_rollout(net, x), ref, rtol=1e-5, atol=1e-6)
        assert_each_varies(salience.transformer_attribution(net, x, 1))


@pytest.mark.parametrize("name, says", [("timm_swin", "Windowed attention"), ("hf_swin", "Windowed attention"),
                                        ("timm_convnext", "saw no attention"), ("hf_convnext", "saw no attention")])
def test_attention_methods_refuse_swin_and_convnext_saying_why(name, says):
    net, x = model(name), image(name, 1)
    for method in (salience.attention_rollout, salience.transformer_attribution):
        with unchanged(net):
            with pytest.raises(SalienceError, match=f"{says}.*gradcam"):
                method(net, x)


# --- every method on a Hugging Face ViT ---------------------------------------------------------

OPTIONS = {"smoothgrad": {"samples": 3}, "integrated_gradients": {"steps": 4}, "rise": {"masks": 32}}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_vit_explained_by_every_method(impl):
    net, x = model(f"hf_vit_{impl}"), image("hf_vit_eager")
    assert set(default_methods(net)) == set(METHODS)
    for name, method in METHODS.items():
        kw = dict(OPTIONS.get(name, {}))
        if name in GUIDED:
            with unchanged(net):
                with pytest.raises(SalienceError, match="unsupported='warn'"):
                    method(net, x, 1, **kw)
            kw["unsupported"] = "ignore"
        with unchanged(net):
            m = method(net, x, 1, **kw)  # Eigen-CAM: one map for any target
        assert m.shape == (2, 32, 32) and torch.isfinite(m).all() and m.abs().sum() > 0, name


def test_hf_output_is_read_through_logits():
    """A ModelOutput: the score is ``.logits`` (vanilla equals the hand-written input gradient)."""
    net, x = model("hf_vit_eager"), image("hf_vit_eager")
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg).logits[:, 2].sum(), xg)
    torch.testing.assert_close(salience.vanilla(net, x, 2), grad.abs().amax(1), rtol=1e-5, atol=1e-8)
    pred = net(x).logits.argmax(1)
    torch.testing.assert_close(salience.gradcam(net, x), salience.gradcam(net, x, pred))



def test_default_layer_search_takes_an_inference_tensor():
    """The search runs one image with its gradient on (to leave out outputs that do not depend on the
    input, such as Swin's relative position bias): an inference-mode tensor is copied, not refused."""
    net = model("hf_swin")
    with torch.inference_mode():
        x = image("hf_swin", 1) + 0
    assert default_layer(net, x) == "swin.layernorm"
    assert salience.gradcam(net, x).shape == (1, 64, 64)


def test_hf_vit_in_bfloat16_gives_one_dtype_and_nearly_one_map_eager_or_sdpa():
    """Eager attention forms A in float32 (``softmax(..., dtype=float32)``), SDPA in the model's
    dtype: the methods work in float32 either way and return x's dtype."""
    torch.manual_seed(0)
    eager, sdpa = _hf_vit("eager").eval(), _hf_vit("sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    eager, sdpa = eager.to(torch.bfloat16), sdpa.to(torch.bfloat16)
    x = image("hf_vit_eager").to(torch.bfloat16)
    for method in (salience.attention_rollout, salience.transformer_attribution):
        a, b = method(eager, x, 1), method(sdpa, x, 1)
        assert a.dtype == b.dtype == torch.bfloat16
        scale = float(a.float().abs().amax())
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05 * scale)


def test_default_methods_leave_out_the_attention_methods_for_swin_and_cnns():
    """Windowed attention (Swin) is refused by the attention methods, so the defaults leave them out;
    a ViT gets them."""
    swin = SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                           num_classes=5)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2, num_classes=5)
    attention = salience.methods.ATTENTION_METHODS
    assert not attention & set(salience.methods.default_methods(swin))
    assert attention <= set(salience.methods.default_methods(vit))


def test_default_layer_reason_is_true_for_a_mean_pooled_vit():
    """BEiT, Hugging Face DINOv2's classifier and ``global_pool="avg"`` ViTs pool the patch tokens
    into the head: there the patch tokens after the last attention do get a gradient, so the reason
    given for the default layer must not say that only the class token reaches the head."""
    torch.manual_seed(0)
    net = _timm_vit(global_pool="avg").eval()
    x = image("timm_vit", 1)
    kept = []
    handle = net.norm.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = net(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[0, out[0].argmax()], kept[0])
    assert grad[:, 1:].abs().amax() > 0  # the patch tokens of the final norm reach the head
    with unchanged(net):
        said = describe_default_layer(net, x)
    assert said.startswith("blocks.1.norm1 ") and "1 prefix token(s) + a 4x4 grid" in said
    assert "only the class token reaches the head" not in said and "get no gradient" not in said
    # a class-token head: the reason still says why the later layers are no use there
    said = describe_default_layer(model("timm_vit"), x)
    assert "a head that reads the class token alone" in said
