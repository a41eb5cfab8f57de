"""Every method of ``salience.METHODS`` on one small model per family of timm and Hugging Face
transformers (random weights, nothing downloaded): an audit, not a timing.

    python benchmarks/zoo-sweep-s51.py --out benchmarks/zoo-sweep-s51                # the whole list
    python benchmarks/zoo-sweep-s51.py --models timm:convnext_atto,hf:resnet --out /tmp/z  # a few

For each model (timm: ``timm.create_model(name, pretrained=False, num_classes=5, img_size=64)`` where
the arch takes ``img_size``, else without it; Hugging Face: ``XForImageClassification(XConfig(...))``
with tiny hidden sizes, its convolutions re-drawn with torch's default init), on two uniform random images (seed 1) of the smallest size of 64, 96, 128 or
its native one that a forward pass takes, in eval mode, it records:

- the Grad-CAM default layer (the search's pick and why) and the layout salience reads there (a map
  ``(B, K, h, w)``, channels-last, or tokens with their prefix and grid);
- ``salience.methods.default_methods(model, x)`` (the methods ``salience explain`` and the demo run
  with their defaults);
- for every method, called as ``METHODS[name](model, x, None, **CHEAP)`` (SmoothGrad 2 samples,
  integrated gradients 2 steps, RISE 4 masks of cell 2, occlusion 16 x 16 windows, stride 16; every other option its default; Score-CAM,
  Ablation-CAM and occlusion, a pass per channel or window, on the first image only):
  ``ok``; ``refused`` (a ``SalienceError``, its first line); ``BUG`` (any other exception); ``NaN``
  (a map with a non-finite value); ``zero`` (a map that is 0 everywhere); ``changed`` (the model
  differs after the call: state dict, modes, requires_grad, grads, hooks, attributes, forwards:
  tests/conftest.py's snapshot); ``timeout`` (over ``--call-timeout`` seconds);
  and where a method in ``default_methods`` was refused (the defaults promise it runs).

A model whose logits are all equal (timm's zero-initialised heads) has its classifier re-drawn (seeded):
otherwise every gradient is 0. Writes ``OUT.md`` and ``OUT.json`` (atomically); ``OUT.jsonl`` holds the
rows as they come (``--resume`` skips the models already there).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

HERE_ = Path(__file__).resolve().parent
# at the end of the path, not first: benchmarks/transformers.py would hide the transformers package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE_] + [str(HERE_), str(HERE_.parent / "tests")]
import timm  # noqa: E402,F401 - before default_layers, which puts this folder first on the path again
import transformers  # noqa: E402
from _common import machine_line  # noqa: E402
from default_layers import _first_line, _layout, _write  # noqa: E402
from conftest import assert_same_snapshot, model_snapshot  # noqa: E402

from salience import SalienceError  # noqa: E402
from salience.methods import METHODS, default_methods  # noqa: E402
from salience.methods.gradcam import default_layer, describe_default_layer  # noqa: E402

CHEAP: dict[str, dict[str, Any]] = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 2},
                                    "rise": {"masks": 4, "cell": 2}, "occlusion": {"window": 16, "stride": 16}}
ONE_IMAGE = frozenset({"scorecam", "ablationcam", "occlusion"})  # a pass per channel / window: the first image only

# family -> one (or two) small timm archs; kwargs tried first (then none)
TIMM: dict[str, list[str]] = {
    "ResNet": ["resnet18", "resnet10t"], "ResNet-D/SE/ECA": ["seresnext26d_32x4d", "eca_resnet33ts"],
    "ResNeSt / SK / Res2Net": ["resnest14d", "skresnet18", "res2net50_14w_8s"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"], "EfficientNet": ["efficientnet_b0"],
    "EfficientNetV2": ["efficientnetv2_rw_t"], "MobileNetV3/V4": ["mobilenetv3_small_050", "mobilenetv4_conv_small",
                                                                  "mobilenetv4_hybrid_medium"],
    "MNASNet / LCNet": ["mnasnet_small", "lcnet_050"], "RegNet": ["regnetx_002"],
    "GhostNet": ["ghostnetv2_100", "ghostnetv3_050"], "RepVGG / MobileOne": ["repvgg_a0", "mobileone_s0"],
    "RepViT": ["repvit_m0_9"], "FastViT": ["fastvit_t8"], "MobileViT": ["mobilevit_xxs", "mobilevitv2_050"],
    "EfficientFormer": ["efficientformer_l1", "efficientformerv2_s0", "swiftformer_xs"],
    "MetaFormer": ["poolformer_s12", "caformer_s18", "convformer_s18"],
    "MaxViT / CoAtNet": ["test_maxvit", "test_coatnet"],
    "Swin": ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224"],
    "BEiT / EVA": ["beitv2_base_patch16_224", "eva02_tiny_patch14_224"],
    "DeiT": ["deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"],
    "ViT": ["test_vit", "vit_small_patch14_reg4_dinov2", "vit_relpos_small_patch16_224", "vit_medium_patch16_gap_256",
            "vit_base_patch16_siglip_224", "vit_small_patch16_rope_224", "vitamin_small_224"],
    "PVT v2 / Twins": ["pvt_v2_b0", "twins_pcpvt_small"], "EdgeNeXt": ["edgenext_xx_small"],
    "InceptionNeXt": ["inception_next_atto"], "Next-ViT": ["nextvit_small"], "HGNet": ["hgnetv2_b0"],
    "RDNet": ["rdnet_tiny"], "MambaOut": ["mambaout_femto"], "StarNet": ["starnet_s050"],
    "DenseNet / DLA": ["densenet121", "dla34"], "CSP / DarkNet": ["cs3darknet_focus_s"], "HRNet": ["hrnet_w18_small"],
    "Inception": ["inception_v3"], "NFNet": ["test_nfnet"], "VGG": ["vgg11"],
    "attention CNNs (BoT / Halo)": ["botnet26t_256", "halonet26t"],
    "LeViT": ["levit_128s"], "TinyViT": ["tiny_vit_5m_224"], "EfficientViT": ["efficientvit_b0", "efficientvit_m0"],
    "FasterNet / SHViT": ["fasternet_t0", "shvit_s1"], "XCiT / CaiT": ["xcit_nano_12_p16_224", "cait_xxs24_224"],
    "PiT / CoaT / VOLO": ["pit_ti_224", "coat_lite_tiny", "volo_d1_224"],
    "GCViT / DaViT / FocalNet": ["gcvit_xxtiny", "davit_tiny", "focalnet_tiny_srf"],
    "MViTv2 / Hiera": ["mvitv2_tiny", "hiera_tiny_224"], "Sequencer": ["sequencer2d_s"],
    "MLP": ["mixer_s16_224"], "ConViT / TNT": ["convit_tiny", "tnt_s_patch16_224"],
}

_V = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
          intermediate_size=64, num_labels=3)
_STAGES4 = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=3)

# family -> (model class, config class, config kwargs): tiny random configs
HF: dict[str, tuple[str, str, dict]] = {
    "vit": ("ViTForImageClassification", "ViTConfig", _V),
    "deit": ("DeiTForImageClassification", "DeiTConfig", _V),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _V),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(_V, use_relative_position_bias=True)),
    "data2vec_vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", _V),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", dict(_V, mlp_ratio=2)),
    "dinov2_registers": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                         dict(_V, mlp_ratio=2, num_register_tokens=4)),
    "vit_msn": ("ViTMSNForImageClassification", "ViTMSNConfig", _V),
    "ijepa": ("IJepaForImageClassification", "IJepaConfig", _V),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", _STAGES4),
    "convnextv2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", _STAGES4),
    "swin": ("SwinForImageClassification", "SwinConfig", dict(image_size=64, patch_size=4, window_size=4, embed_dim=24,
                                                               depths=[2, 2], num_heads=[2, 4], num_labels=3)),
    "swinv2": ("Swinv2ForImageClassification", "Swinv2Config", dict(image_size=64, patch_size=4, window_size=4,
                                                                     embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                                                     num_labels=3)),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig",
                  dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                       num_labels=3)),
    "mobilevitv2": ("MobileViTV2ForImageClassification", "MobileViTV2Config", dict(image_size=64, width_multiplier=0.25,
                                                                                   num_labels=3)),
    "efficientformer": ("EfficientFormerForImageClassification", "EfficientFormerConfig",
                        dict(depths=[1, 1, 1, 2], hidden_sizes=[8, 16, 24, 32], num_meta3d_blocks=1, num_labels=3)),
    "levit": ("LevitForImageClassification", "LevitConfig", dict(image_size=64, hidden_sizes=[32, 48, 64],
                                                                 num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                                                                 key_dim=[8, 8, 8], num_labels=3)),
    "poolformer": ("PoolFormerForImageClassification", "PoolFormerConfig", _STAGES4),
    "regnet": ("RegNetForImageClassification", "RegNetConfig", dict(_STAGES4, embedding_size=8, groups_width=8)),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", dict(_STAGES4, embedding_size=8)),
    "bit": ("BitForImageClassification", "BitConfig", dict(embedding_size=32, hidden_sizes=[128] * 4, depths=[1] * 4,
                                                           num_labels=3)),  # group norms of 32 groups
    "segformer": ("SegformerForImageClassification", "SegformerConfig",
                  dict(num_encoder_blocks=4, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                       num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32, num_labels=3)),
    "pvt": ("PvtForImageClassification", "PvtConfig", dict(image_size=64, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                                           num_attention_heads=[1, 1, 2, 2], num_labels=3)),
    "pvt_v2": ("PvtV2ForImageClassification", "PvtV2Config", dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                                                  num_attention_heads=[1, 1, 2, 2], num_labels=3)),
    "cvt": ("CvtForImageClassification", "CvtConfig", dict(num_labels=3)),  # CvT-13: its lists are per stage
    "focalnet": ("FocalNetForImageClassification", "FocalNetConfig", dict(image_size=64, embed_dim=8, depths=[1, 1, 1, 1],
                                                                           num_labels=3)),
    "hiera": ("HieraForImageClassification", "HieraConfig", dict(image_size=[64, 64], embed_dim=8, num_heads=[1, 1, 1, 1],
                                                                 depths=[1, 1, 1, 1], num_labels=3)),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", "MobileNetV1Config", dict(depth_multiplier=0.25, num_labels=3)),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", dict(depth_multiplier=0.35, num_labels=3)),
    "efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig",
                     dict(image_size=64, width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640, num_labels=3)),
    "swiftformer": ("SwiftFormerForImageClassification", "SwiftFormerConfig", dict(depths=[1, 1, 1, 1],
                                                                                  embed_dims=[8, 16, 24, 32], num_labels=3)),
    "hgnet_v2": ("HGNetV2ForImageClassification", "HGNetV2Config", dict(num_labels=3)),
    "dinat": ("DinatForImageClassification", "DinatConfig", dict(num_labels=3)),
    "clip": ("CLIPForImageClassification", "CLIPConfig", dict(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64), text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=64),
        num_labels=3)),
    "siglip": ("SiglipForImageClassification", "SiglipConfig", dict(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64), text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=64),
        num_labels=3)),
    "timm_wrapper": ("TimmWrapperForImageClassification", "TimmWrapperConfig", dict(architecture="resnet18",
                                                                                    num_labels=3)),
}


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout()


def _forward_ok(model: torch.nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The logits of ``x`` (a Hugging Face output's ``logits``), or None when the model does not take it."""
    with torch.no_grad():
        try:
            out = model(x)
            out = out.logits if hasattr(out, "logits") else out
        except Exception:  # noqa: BLE001 - a size the model does not take, whatever it raises
            return None
    return out if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def build_timm(arch: str) -> tuple[torch.nn.Module, list[int]]:
    """The arch at 64 px where it takes ``img_size`` (then its native size), 5 classes; and sizes to try."""
    torch.manual_seed(0)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=5, img_size=64)
        if _forward_ok(model.eval(), torch.rand(1, 3, 64, 64)) is not None:
            return model, [64]
    except Exception:  # noqa: BLE001 - an arch without img_size (most CNNs), or that cannot be that small
        pass
    torch.manual_seed(0)  # takes img_size but not at 64 px (EfficientFormer's attention biases): its native size
    model = timm.create_model(arch, pretrained=False, num_classes=5)
    native = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return model, [s for s in (64, 96, 128) if s < native] + [native]


def build_hf(name: str) -> tuple[torch.nn.Module, list[int]]:
    """The Hugging Face family ``name`` from its tiny config; sizes to try (the config's first)."""
    cls_name, cfg_name, kw = HF[name]
    if not hasattr(transformers, cls_name):
        raise LookupError(f"transformers {transformers.__version__} has no {cls_name}")
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, cls_name)(config)
    for m in model.modules():  # HF's normal(0, 0.02) convolutions fade a deep tiny net's signal to ~1e-33: torch's own
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    size = kw.get("image_size", kw.get("vision_config", {}).get("image_size", 64))
    size = size[0] if isinstance(size, (list, tuple)) else size
    return model, list(dict.fromkeys([int(size), 32, 64, 96, 128, 224]))


def pick_input(model: torch.nn.Module, sizes: list[int], n: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``n`` uniform images (seed 1) of the first size a forward pass takes, and their logits."""
    channels = 3
    for s in sizes:
        x = torch.rand(n, channels, s, s, generator=torch.Generator().manual_seed(1))
        logits = _forward_ok(model, x)
        if logits is not None:
            return x, logits
    return None, None


def redraw_zero_head(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor) -> list[str]:
    """Re-draw a classifier whose logits are all equal (gradients would all be 0); what was done."""
    if float(logits.max() - logits.min()) != 0.0:
        return []
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "classifier", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return ["every logit equal at init: gradients are 0"]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    return ["every logit equal at init (zero head): classifier re-drawn"]


def verdict(out: Any) -> tuple[str, str]:
    """``(status, detail)`` of a method's map."""
    if not isinstance(out, torch.Tensor):
        return "BUG", f"returned {type(out).__name__}, not a tensor"
    m = out.detach().float()
    if not torch.isfinite(m).all():
        return "NaN", f"{int((~torch.isfinite(m)).sum())} non-finite of {m.numel()}"
    if float(m.abs().max()) == 0.0:
        return "zero", f"shape {list(m.shape)}"
    return "ok", f"shape {list(m.shape)}, {float(m.min()):.3g} .. {float(m.max()):.3g}"


def run_method(model: torch.nn.Module, x: torch.Tensor, name: str, timeout: int) -> dict:
    """One method on ``model``: its status, detail, seconds, and whether the model changed."""
    before = model_snapshot(model)
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        status, detail = verdict(METHODS[name](model, x[:1] if name in ONE_IMAGE else x, None, **CHEAP.get(name, {})))
    except _Timeout:
        status, detail = "timeout", f"over {timeout} s"
    except SalienceError as e:
        status, detail = "refused", _first_line(e)
    except Exception as e:  # noqa: BLE001 - the bugs this sweep looks for
        tb = [f for f in traceback.extract_tb(e.__traceback__) if "salience" in f.filename]
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        status, detail = "BUG", f"{type(e).__name__}: {_first_line(e)}{where}"
    finally:
        signal.alarm(0)
    row = {"status": status, "detail": detail, "s": round(time.perf_counter() - t0, 2)}
    if status == "zero" and "relu" in inspect.signature(METHODS[name]).parameters:
        row["detail"] += "; relu=False: " + _without_relu(model, x, name, timeout)
    try:
        assert_same_snapshot(before, model_snapshot(model))
    except AssertionError as e:
        row["changed"] = str(e)[:300]
    return row


def _without_relu(model: torch.nn.Module, x: torch.Tensor, name: str, timeout: int) -> str:
    """The verdict on ``name``'s map with ``relu=False``: a map below 0 everywhere (random weights) is 0 after
    the ReLU, not a defect; 0 there too is one."""
    signal.alarm(timeout)
    try:
        one = x[:1] if name in ONE_IMAGE else x
        return " ".join(verdict(METHODS[name](model, one, None, relu=False, **CHEAP.get(name, {}))))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {_first_line(e)}"
    finally:
        signal.alarm(0)


def default_info(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """The Grad-CAM default layer, its description (:func:`~salience.methods.gradcam.describe_default_layer`: its
    layout and why), its layout; and default_methods on ``x[:1]``."""
    info: dict[str, Any] = {}
    try:
        name = default_layer(model, x[:1])
        # the public one-line description (the layer, its output's layout, why it was picked); the search is cached
        info["default_layer"], info["why"] = name, describe_default_layer(model, x[:1])
        info["layout"], info["layer_output_shape"], _ = _layout(model, name, x[:1])
    except SalienceError as e:
        info["default_layer"], info["refused"] = None, _first_line(e)
    except Exception as e:  # noqa: BLE001
        info["default_layer"], info["error"] = None, f"{type(e).__name__}: {_first_line(e)}"
    try:
        info["default_methods"] = default_methods(model, x[:1])
    except Exception as e:  # noqa: BLE001
        info["default_methods_error"] = f"{type(e).__name__}: {_first_line(e)}"
    return info


def sweep_one(key: str, images: int, timeout: int) -> dict:
    """One model's row: build, input, defaults, every method."""
    kind, name = key.split(":", 1)
    row: dict[str, Any] = {"model": key, "family": family_of(key)}
    t0 = time.perf_counter()
    try:
        model, sizes = build_timm(name) if kind == "timm" else build_hf(name)
    except Exception as e:  # noqa: BLE001
        row["status"] = f"not built: {type(e).__name__}: {_first_line(e)}"
        return row
    model.eval()
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    x, logits = pick_input(model, sizes, images)
    if x is None:
        row["status"] = f"no forward pass at sizes {sizes}"
        return row
    row["input"] = list(x.shape)
    row["notes"] = redraw_zero_head(model, x, logits)
    after = _forward_ok(model, x)
    if after is not None and len(x) > 1 and torch.equal(after[0], after[1]):
        row["notes"].append("the two images give the same logits: at this random init the output does not depend "
                            "on the input, so every map is 0 or constant (not the method's fault)")
    row.update(default_info(model, x))
    row["methods"] = {m: run_method(model, x, m, timeout) for m in METHODS}
    row["default_but_refused"] = promised_but_refused(row)
    row["status"] = "ok"
    row["total_s"] = round(time.perf_counter() - t0, 1)
    return row


def promised_but_refused(row: dict) -> list[str]:
    """The methods in the row's ``default_methods`` (those the defaults say run) that raised."""
    promised = set(row.get("default_methods", []))
    return [m for m, r in row.get("methods", {}).items() if m in promised and r["status"] in ("refused", "BUG")]


def family_of(key: str) -> str:
    kind, name = key.split(":", 1)
    if kind == "hf":
        return "HF " + name
    return next((f for f, archs in TIMM.items() if name in archs), "")


def all_keys() -> list[str]:
    return [f"timm:{a}" for archs in TIMM.values() for a in archs] + [f"hf:{n}" for n in HF]


SHORT = {"ok": "ok", "refused": "R", "BUG": "**BUG**", "NaN": "**NaN**", "zero": "zero", "timeout": "T"}


def _mark(row: dict, name: str) -> str:
    """Method ``name``'s mark in ``row``: ``0-`` for a map that is 0 after the ReLU but not without it (every value
    negative: random weights, not a defect; guided Grad-CAM, Grad-CAM's map times guided backprop's, where
    Grad-CAM's is), else :data:`SHORT`'s."""
    cell = row["methods"][name]
    if cell["status"] == "zero" and ("relu=False: ok" in cell["detail"] or (
            name == "guided_gradcam" and "relu=False: ok" in row["methods"]["gradcam"]["detail"])):
        return "0-"
    return SHORT[cell["status"]]


def counts(rows: list[dict]) -> dict[str, int]:
    """How many (model, method) cells have each status (``changed`` counted apart)."""
    c: dict[str, int] = {}
    for r in rows:
        for n, cell in r.get("methods", {}).items():
            mark = _mark(r, n).strip("*")
            c[mark] = c.get(mark, 0) + 1
            if "changed" in cell:
                c["changed"] = c.get("changed", 0) + 1
    return c


def table(rows: list[dict]) -> str:
    """The markdown grid: one row per model, one column per method, then the findings in full."""
    names = list(METHODS)
    lines = ["| model | input | default layer | layout | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| `{r['model']}` | {r.get('status', '')[:120]} |")
            continue
        layer = f"`{r['default_layer']}`" if r.get("default_layer") else ("refused" if "refused" in r else "**error**")
        cells = []
        for n in names:
            cell = r["methods"][n]
            mark = _mark(r, n) + (" **changed**" if "changed" in cell else "")
            cells.append(mark + (" (!)" if n in promised_but_refused(r) else ""))
        lines.append(f"| `{r['model']}` | {r['input'][-1]} | {layer} | {str(r.get('layout', '-'))[:60]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """Every cell that is not ok or refused, every refusal of a method ``default_methods`` promises, every
    model changed, each a line."""
    out = []
    for r in rows:
        for n, cell in r.get("methods", {}).items():
            if _mark(r, n) not in ("ok", "R", "0-", "T") or "changed" in cell:
                out.append(f"- `{r['model']}` {n}: {cell['status']}: {cell['detail']}"
                           + (f"; model changed: {cell['changed']}" if "changed" in cell else ""))
            elif n in promised_but_refused(r):
                out.append(f"- `{r['model']}` {n}: in default_methods but refused: {cell['detail']}")
        for k in ("error", "default_methods_error"):
            if k in r:
                out.append(f"- `{r['model']}` {k}: {r[k]}")
        out += [f"- `{r['model']}` (note): {note}" for note in r.get("notes", [])]
    return out


def refusals(rows: list[dict]) -> list[str]:
    """The distinct refusal messages, with the (model, method) cells that gave each."""
    by: dict[str, list[str]] = {}
    for r in rows:
        for n, cell in r.get("methods", {}).items():
            if cell["status"] == "refused":
                by.setdefault(cell["detail"][:160], []).append(f"{r['model']}/{n}")
    return [f"- {len(v)}x: {k}  (e.g. {', '.join(v[:3])})" for k, v in sorted(by.items(), key=lambda kv: -len(kv[1]))]


def report(rows: list[dict], argv: list[str], seconds: float, load: tuple) -> str:
    c = counts(rows)
    n_ok = sum(1 for r in rows if r.get("status") == "ok")
    head = ["# Every method on the model zoo (timm and Hugging Face families, random weights): session 51",
            "",
            f"`python benchmarks/zoo-sweep-s51.py {' '.join(argv)}`: {machine_line(*load)}; {seconds:.0f} s "
            "(the rows' times added up: rows kept with --resume may come from other runs of the same list).",
            "",
            f"{len(rows)} models, {n_ok} built and run; {sum(v for k, v in c.items() if k != 'changed')} (model, "
            "method) cells: "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + ".",
            "",
            "Cells: ok; R = refused with a `SalienceError` (messages below); **BUG** = another exception; **NaN**; "
            "0- = 0 after the ReLU, a map below 0 everywhere with relu=False (random weights: not a defect); zero = an "
            "all-zero map otherwise (see Findings); T = over the call "
            "timeout; **changed** = the model differed after the call; (!) = in `default_methods` but not ok.",
            "Options: SmoothGrad samples=2, integrated gradients steps=2, RISE masks=4 cell=2, occlusion window=16 "
            "stride=16; the rest default. "
            "Two uniform random images (seed 1; Score-CAM, Ablation-CAM, occlusion: the first), target None (the "
            "predicted class).",
            ""]
    return "\n".join(head + [table(rows), "", "## Findings", ""] + (findings(rows) or ["none"])
                     + ["", "## Refusals", ""] + refusals(rows)) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated timm:ARCH / hf:FAMILY (default: the whole list)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--call-timeout", type=int, default=120)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in OUT.jsonl")
    ap.add_argument("--out", default=str(HERE_ / "zoo-sweep-s51"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("timm").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    keys = args.models.split(",") if args.models else all_keys()
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    done: dict[str, dict] = {}
    if args.resume and jsonl.exists():
        done = {r["model"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    load0 = os.getloadavg()
    with jsonl.open("a" if args.resume else "w") as f:
        for key in keys:
            if key in done:
                continue
            row = sweep_one(key, args.images, args.call_timeout)
            done[key] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            bad = [n for n, c in row.get("methods", {}).items() if c["status"] not in ("ok", "refused") or "changed" in c]
            print(f"{key}: {row.get('status')} {row.get('total_s', '')} s; default {row.get('default_layer')}; "
                  f"not ok: {bad}", flush=True)
            gc.collect()
    rows = [done[k] for k in keys if k in done]
    _write(out.with_suffix(".json"), json.dumps(rows, indent=1))
    _write(out.with_suffix(".md"), report(rows, argv, sum(r.get("total_s", 0.0) for r in rows), (load0, os.getloadavg())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
