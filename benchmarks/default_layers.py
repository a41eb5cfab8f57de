"""The CAMs' default layer over timm architectures (random weights): a reproducible survey.

    python benchmarks/default_layers.py --threads 1 --out benchmarks/default-layers-timm    # the list below
    python benchmarks/default_layers.py --archs resnet18,vit_tiny_patch16_224 --out /tmp/dl  # a few

For each architecture, ``timm.create_model(name, pretrained=False)`` (seeded, eval mode) on one
uniform random image (seed 1) of a small size the model accepts: ``--size`` (default 128) square when
that is below the arch's ``default_cfg`` input size and a forward pass takes it, else the native size
(ViTs, Swin, LeViT, ... are built for one size). Records:

- the default layer (:func:`salience.methods.gradcam.default_layer`) and why it was picked, or the
  first line of the :class:`salience.SalienceError` when there is none (CrossViT, non-lite CoaT);
- the layout salience reads there (:func:`salience.methods._tokens.layer_layout` on the layer's output
  of that image: a map ``(B, K, h, w)``, channels-last ``(B, h, w, K)``, or tokens with their prefix
  and grid), with the output's shape;
- whether ``salience.gradcam`` runs at that default for the predicted class and gives a finite,
  non-constant map (its min / max; a constant map is run again with ``relu=False`` to tell "all
  negative" from "no signal at all", e.g. a layer whose gradient is zero; and whether the layer's output,
  read as a grid, varies over positions at all: random weights can collapse it), and the time of that
  one call (the default-layer search, run just before, is cached: not included); where the layout is not readable, Grad-CAM again
  with the ``prefix_tokens=`` the error suggests;
- ``salience.methods.default_methods(model, x)``: the methods left out (the full list in the .json),
  and without ``x`` where that differs (modules only: a bare model has no input size).

A model whose logits are all equal on the image (timm initialises Hiera's ``head.fc`` to 0) has its
classifier re-drawn (seeded, normal 0.02), said in the row: otherwise every gradient is 0.
An architecture the installed timm does not have gets a row saying so. Writes ``OUT.md`` and
``OUT.json`` (each to a temporary file, then renamed). Random weights say where the default is and
whether a map comes out, not whether it is a good explanation.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine_info, machine_line  # noqa: E402

import salience  # noqa: E402
from salience import SalienceError  # noqa: E402
from salience.methods import METHODS, default_methods  # noqa: E402
from salience.methods._layer_search import _pick_default  # noqa: E402
from salience._core.layers import resolve_layer  # noqa: E402
from salience.methods._tokens import layer_layout  # noqa: E402

# family -> timm architectures (small variants: the whole list runs in a few minutes on one core)
FAMILIES: dict[str, list[str]] = {
    "ResNet": ["resnet18", "resnet50"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"],
    "EfficientNet": ["efficientnet_b0"],
    "RegNet": ["regnetx_002", "regnety_002"],
    "MobileNet": ["mobilenetv3_small_100", "mobilenetv4_conv_small"],
    "other CNNs": ["densenet121", "dla34", "ghostnetv2_100", "hgnetv2_b0", "repvit_m0_9", "rdnet_tiny",
                   "inception_next_tiny", "starnet_s1", "fastvit_t8", "edgenext_xx_small"],
    "MetaFormer": ["poolformer_s12", "convformer_s18", "caformer_s18", "mambaout_femto"],
    "MLP": ["gmlp_ti16_224", "resmlp_12_224", "mixer_s16_224"],
    "ViT": ["vit_tiny_patch16_224", "vit_small_patch16_rope_224", "vit_small_patch14_reg4_dinov2",
            "vit_little_patch16_reg4_gap_256", "flexivit_small", "vitamin_small_224"],
    "DeiT": ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"],
    "BEiT / EVA": ["beit_base_patch16_224", "eva02_tiny_patch14_224"],
    "TNT": ["tnt_s_patch16_224"],
    "Swin": ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224"],
    "MaxViT / CoAtNet": ["maxvit_tiny_tf_224", "maxvit_rmlp_pico_rw_256", "maxxvit_rmlp_nano_rw_256",
                         "coatnet_nano_rw_224"],
    "CoaT": ["coat_lite_tiny", "coat_tiny"],
    "CrossViT": ["crossvit_tiny_240"],
    "VOLO": ["volo_d1_224"],
    "LeViT": ["levit_128s", "levit_conv_128s"],
    "PiT": ["pit_ti_224", "pit_ti_distilled_224"],
    "PVT v2": ["pvt_v2_b0"],
    "TinyViT": ["tiny_vit_5m_224"],
    "EfficientFormer": ["efficientformer_l1", "efficientformerv2_s0", "swiftformer_xs"],
    "EfficientViT": ["efficientvit_b0", "efficientvit_m0"],
    "MobileViT": ["mobilevit_xxs", "mobilevitv2_050"],
    "ConViT": ["convit_tiny"],
    "CaiT": ["cait_xxs24_224"],
    "XCiT": ["xcit_nano_12_p16_224"],
    "Twins": ["twins_pcpvt_small", "twins_svt_small"],
    "NesT": ["nest_tiny_jx"],
    "Hiera": ["hiera_tiny_224"],
    "MViTv2": ["mvitv2_tiny"],
    "DaViT / GCViT / FocalNet": ["davit_tiny", "gcvit_xxtiny", "focalnet_tiny_srf"],
    "Next-ViT": ["nextvit_small"],
}


def family_of(arch: str) -> str:
    return next((f for f, archs in FAMILIES.items() if arch in archs), "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:400]


def _forward_ok(model: torch.nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The logits of ``x``, or None when the model does not take it."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception:  # noqa: BLE001 - a size the model does not take, whatever it raises
        return None
    return out if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def _layer_output(model: torch.nn.Module, name: str, x: torch.Tensor) -> Any:
    """The output of layer ``name`` on ``x`` (a tuple's leading tensor), by a forward hook."""
    mod = resolve_layer(model, name)
    seen: list = []

    def hook(_m, _i, out):
        if not seen:
            while isinstance(out, (tuple, list)) and out:
                out = out[0]
            seen.append(out)

    h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return mod, (seen[0] if seen else None)


def _layout(model: torch.nn.Module, name: str, x: torch.Tensor) -> tuple[str, Optional[list[int]], dict]:
    """``(description, output shape, layout fields)`` of the default layer's output on ``x``."""
    mod, out = _layer_output(model, name, x)
    if not isinstance(out, torch.Tensor):
        return f"output is {type(out).__name__}, not a tensor", None, {}
    shape = list(out.shape)
    try:
        lay = layer_layout(model, mod, out.shape, x.shape, what=f"layer {name!r}")
    except SalienceError as e:
        return f"not readable: {_first_line(e)}", shape, {"kind": None}
    grid = lay.to_grid(out).detach().float()  # (1, K, h, w)
    k, h, w = grid.shape[1:]
    # the layer's output at every position the same (a random-weights collapse): any map there is constant
    spread = float((grid.amax(dim=(2, 3)) - grid.amin(dim=(2, 3))).abs().max())
    varies = spread > 1e-6 * float(grid.abs().max()) and spread > 0.0
    if lay.kind == "tokens":
        text = f"tokens (B, {shape[1]}, {shape[2]}): {lay.prefix} prefix + {h}x{w}"
    elif lay.kind == "channels_last":
        text = f"channels-last (B, {h}, {w}, {k})"
    else:
        text = f"map (B, {k}, {h}, {w})"
    return text, shape, {"kind": lay.kind, "prefix": lay.prefix, "grid": [int(h), int(w)], "channels": int(k),
                         "varies_over_positions": varies, "position_spread": spread}


def _pick_size(model: torch.nn.Module, native: tuple[int, int, int], small: int) -> tuple[torch.Tensor, str, Optional[torch.Tensor]]:
    """The image (seed 1) the arch is surveyed on, why that size, and its logits (None: none taken)."""
    c, hh, ww = native
    g = torch.Generator().manual_seed(1)
    if small < min(hh, ww):
        x = torch.rand(1, c, small, small, generator=g)
        logits = _forward_ok(model, x)
        if logits is not None:
            return x, f"{small} (native {hh}x{ww})", logits
    x = torch.rand(1, c, hh, ww, generator=torch.Generator().manual_seed(1))
    why = f"{hh}x{ww} native" + (f" ({small} refused)" if small < min(hh, ww) else "")
    return x, why, _forward_ok(model, x)


def survey_one(arch: str, small: int) -> dict:
    """One architecture's row (see the module doc)."""
    import timm

    row: dict[str, Any] = {"arch": arch, "family": family_of(arch)}
    if arch not in timm.list_models():
        row["status"] = f"not in timm {timm.__version__}"
        return row
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = timm.create_model(arch, pretrained=False).eval()
    except Exception as e:  # noqa: BLE001
        row["status"] = f"timm could not build it: {type(e).__name__}: {_first_line(e)}"
        return row
    row["create_s"] = round(time.perf_counter() - t0, 2)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    native = tuple(int(v) for v in model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x, row["size"], logits = _pick_size(model, native, small)
    row["input_shape"] = list(x.shape)
    if logits is None:
        row["status"] = "the model's forward failed on its native size"
        return row
    notes = []
    if float(logits.max() - logits.min()) == 0.0:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor):
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
            logits = _forward_ok(model, x)
            notes.append("every logit equal at init (timm's zero head): classifier re-drawn")
        else:
            notes.append("every logit equal at init: gradients are 0")
    target = int(logits.argmax(1))
    row["target"] = target
    row["status"] = "ok"
    # the default layer
    try:
        name, why = _pick_default(model, x)
        row["default_layer"], row["why"] = name, why
    except SalienceError as e:
        row["default_layer"], row["refused"] = None, _first_line(e)
    except Exception as e:  # noqa: BLE001 - not a refusal: a failure of the search, worth a row
        row["default_layer"], row["error"] = None, f"{type(e).__name__}: {_first_line(e)}"
    if row.get("default_layer"):
        row["layout"], row["layer_output_shape"], row["layout_fields"] = _layout(model, row["default_layer"], x)
        try:
            t1 = time.perf_counter()
            cam = salience.gradcam(model, x, target)
            row["gradcam_s"] = round(time.perf_counter() - t1, 3)
            row.update(_judge(cam))
            if row["gradcam"] == "constant":
                raw = salience.gradcam(model, x, target, relu=False)
                row["no_relu"] = _judge(raw)
        except Exception as e:  # noqa: BLE001 - recorded, the survey goes on
            row["gradcam"] = f"failed: {type(e).__name__}: {_first_line(e)}"
            hint = re.search(r"pass prefix_tokens=(\d+)", str(e))
            if isinstance(e, SalienceError) and hint:  # what the error suggests, tried
                k = int(hint.group(1))
                try:
                    row["with_suggested_prefix"] = {"prefix_tokens": k, **_judge(
                        salience.gradcam(model, x, target, prefix_tokens=k, relu=False))}
                except Exception as e2:  # noqa: BLE001
                    row["with_suggested_prefix"] = {"prefix_tokens": k, "gradcam": f"failed: {_first_line(e2)}"}
    # default_methods on this image, and without one (modules only)
    try:
        with_x = default_methods(model, x)
        row["default_methods"] = with_x
        row["left_out"] = [m for m in METHODS if m not in with_x]
        without = default_methods(model)
        if without != with_x:
            row["left_out_without_x"] = [m for m in METHODS if m not in without]
    except Exception as e:  # noqa: BLE001
        row["default_methods"] = f"failed: {type(e).__name__}: {_first_line(e)}"
    row["notes"] = notes
    row["total_s"] = round(time.perf_counter() - t0, 2)
    return row


def _judge(cam: torch.Tensor) -> dict:
    """Finite and non-constant? With the map's min / max."""
    cam = cam.detach().float()
    finite = bool(torch.isfinite(cam).all())
    lo, hi = float(cam.min()), float(cam.max())
    scale = max(abs(lo), abs(hi))
    if not finite:
        verdict = "not finite"
    elif hi - lo <= 1e-6 * scale or scale == 0.0:
        verdict = "constant"
    else:
        verdict = "ok"
    return {"gradcam": verdict, "map_min": lo, "map_max": hi, "map_shape": list(cam.shape)}


def _short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[:n].rstrip() + "..."


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    lines = ["| family | arch | input | default layer | layout there | Grad-CAM (predicted class) | map min / max | "
             "Grad-CAM s | default_methods leaves out | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['family']} | `{r['arch']}` | {r.get('size', '')} | – | – | – | – | – | – | "
                         f"{_cell(r['status'])} |")
            continue
        if r.get("default_layer"):
            layer = f"`{r['default_layer']}`"
        elif "refused" in r:
            layer = "refused: " + _cell(_short(r["refused"], 160))
        else:
            layer = f"**error**: {_cell(r['error'])}"
        verdict = r.get("gradcam", "–")
        if verdict != "ok" and verdict != "–":
            verdict = f"**{_cell(_short(verdict))}**"
            if "no_relu" in r:
                verdict += f" (relu=False: {r['no_relu']['gradcam']})"
            if "with_suggested_prefix" in r:
                sp = r["with_suggested_prefix"]
                verdict += (f"; with the prefix_tokens={sp['prefix_tokens']} it suggests, relu=False: "
                            f"{_short(sp['gradcam'])}")
        if r.get("layout_fields", {}).get("varies_over_positions") is False:
            verdict += "; the layer's output is the same at every position"
        rng = f"{r['map_min']:.3g} / {r['map_max']:.3g}" if "map_min" in r else "–"
        sec = f"{r['gradcam_s']:.2f}" if "gradcam_s" in r else "–"
        left = r.get("left_out")
        left = (", ".join(left) or "none") if isinstance(left, list) else _cell(r.get("default_methods", ""))
        if "left_out_without_x" in r:
            left += f" (without x: {', '.join(r['left_out_without_x']) or 'none'})"
        lines.append(f"| {r['family']} | `{r['arch']}` | {r['size']} | {layer} | {_cell(_short(r.get('layout', '–')))} | "
                     f"{verdict} | {rng} | {sec} | {left} | {_cell('; '.join(r.get('notes', [])))} |")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file in the same folder, renamed: never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=None,
                    help="comma-separated timm architectures (default: the built-in list, every family)")
    ap.add_argument("--size", type=int, default=128,
                    help="the square size tried first when below the arch's native one (default 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "default-layers-timm"))
    args = ap.parse_args(argv)

    import timm

    torch.set_num_threads(args.threads)
    logging.getLogger("timm").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    archs = ([a.strip() for a in args.archs.split(",") if a.strip()] if args.archs
             else [a for archs in FAMILIES.values() for a in archs])
    info = machine_info()
    info["timm"] = timm.__version__
    t0 = time.time()
    rows = []
    for arch in archs:
        row = survey_one(arch, args.size)
        rows.append(row)
        print(f"{arch}: {row.get('default_layer') or row.get('refused') or row.get('error') or row['status']}"
              f" | {row.get('layout', '')} | {row.get('gradcam', '')} | {row.get('total_s', '')} s", flush=True)
        gc.collect()
    load_end = os.getloadavg()
    report = {"config": vars(args), "machine": info, "loadavg_end": load_end, "wall_s": round(time.time() - t0, 1),
              "rows": rows}
    out = Path(args.out)
    cmd = " ".join(["python benchmarks/default_layers.py", *(sys.argv[1:] if argv is None else argv)])
    flagged = [r["arch"] for r in rows if r.get("status") == "ok" and r.get("default_layer")
               and r.get("gradcam") != "ok"]
    md = [f"# The CAMs' default layer on {len(rows)} timm architectures (random weights)", "",
          f"`{cmd}`: timm {timm.__version__}, salience {info.get('salience')}, Python {info['python']}, "
          f"{args.threads} thread(s), {report['wall_s']:.0f} s. "
          + machine_line(info["loadavg_start"], load_end), "",
          "One uniform random image (seed 1) per arch, at `--size` when the model takes it, else its native size; "
          "random weights (seed 0), so the maps say where the default is and that a map comes out, not how good "
          "it is. Grad-CAM is for the predicted class; *constant* means max - min <= 1e-6 of its largest value "
          "(run again with `relu=False` to tell all-negative from no signal; *the layer's output is the same at "
          "every position* when it is, read as a grid: then no map there can vary). Where the layout is not "
          "readable, Grad-CAM is run again with the `prefix_tokens=` its error suggests. The reasons for each "
          "default, the full messages and the full `default_methods` lists are in the .json.", "",
          table(rows), "",
          f"Defaults where Grad-CAM gave no usable map: {', '.join(flagged) if flagged else 'none'}.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out.with_name(out.name + ".json"), json.dumps(report, indent=2))
    _write(out.with_name(out.name + ".md"), "\n".join(md))
    print("\n".join(md[-4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
