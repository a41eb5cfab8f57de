"""What the command line says about the model's input and output: preprocessing and class names.

The model's own :class:`~salience._core.info.ModelInfo` is the default; ``--size``, ``--crop``,
``--resize``, ``--resize-mode``, ``--mean``, ``--std`` and ``--channels`` replace parts of it
(:func:`salience.loading.images.with_preprocessing`), ``--labels FILE`` names the outputs of any
model, and a classifier with 1000 outputs and no names gets ImageNet-1k's
(:func:`salience.loading.models.name_classes`).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Optional

from salience._core.errors import SalienceError
from salience._core.info import ModelInfo
from salience._core.tensors import check_int
from salience.loading.images import RESIZE_MODES, check_input_pixels, with_preprocessing
from salience.loading.custom import sides_out_of_bounds
from salience.loading.models import name_classes, read_labels


def add_input_args(p: argparse.ArgumentParser) -> None:
    """The preprocessing options and ``--labels``."""
    g = p.add_argument_group("preprocessing", "  default: the model's own (torchvision: resize 256, crop 224, "
                             "ImageNet mean/std;\n  demo models: 64x64); these replace parts of it")
    g.add_argument("--size", metavar="H[,W]", help="the model's input size (in crop mode: the centre crop)")
    g.add_argument("--crop", metavar="H[,W]", help="centre-crop size after --resize: --size with --resize-mode crop")
    g.add_argument("--resize", metavar="N", help="shorter side before the centre crop (implies --resize-mode crop); "
                   "default: the model's, kept in ratio to a new --size, or max(size)")
    g.add_argument("--resize-mode", metavar="MODE",
                   help=f"one of {', '.join(RESIZE_MODES)}: resize the shorter side then centre-crop, resize to the "
                        "size directly, or keep the image as it is (default: the model's)")
    g.add_argument("--mean", metavar="A,B,C", help="per-channel mean subtracted from the [0, 1] image")
    g.add_argument("--std", metavar="A,B,C", help="per-channel std the image is divided by")
    g.add_argument("--channels", metavar="N", help="the model's input channels: 1 (gray: each image becomes its "
                   "luma) or 3 (RGB); default: the model's (3 unless it says)")
    p.add_argument("--labels", metavar="FILE", help="class names: one per line, a JSON list, or JSON {index: name}; "
                   "one per model output (default: the model's; 1000 outputs without names: ImageNet-1k's)")


@dataclass
class Inputs:
    """The preprocessing options given (as :func:`with_preprocessing` keywords), their flags, and
    the names of ``--labels``."""

    preprocessing: dict[str, Any]
    flags: dict[str, str]
    labels: Optional[tuple[str, ...]]


def read_inputs(args: argparse.Namespace) -> Inputs:
    """The options read and checked one by one (before the model is loaded)."""
    if args.size is not None and args.crop is not None:
        raise SalienceError("--size and --crop both set the input size; give one")
    if args.crop is not None and args.resize_mode not in (None, "crop"):
        raise SalienceError(f"--crop is the centre crop of --resize-mode crop, not of {args.resize_mode!r}")
    given: dict[str, Any] = {}
    flags = {"size": "--crop" if args.crop is not None else "--size", "resize": "--resize",
             "resize_mode": "--resize-mode", "mean": "--mean", "std": "--std", "channels": "--channels"}
    size_text = args.crop if args.crop is not None else args.size
    if size_text is not None:
        given["size"] = _ints(size_text, flags["size"], "H or H,W in pixels")
        check_input_pixels(given["size"], flags["size"])
    if args.crop is not None:
        given["resize_mode"] = "crop"
    if args.resize is not None:
        given["resize"] = _ints(args.resize, "--resize", "the shorter side in pixels", count=1)[0]
        check_input_pixels([given["resize"]], "--resize", resize=True)
    if args.resize_mode is not None:
        given["resize_mode"] = args.resize_mode
    if args.channels is not None:
        given["channels"] = _ints(args.channels, "--channels", "1 (gray) or 3 (RGB)", count=1)[0]
        if given["channels"] not in (1, 3):
            raise SalienceError(f"--channels must be 1 (gray) or 3 (RGB), got {args.channels!r}")
    for key in ("mean", "std"):
        if getattr(args, key) is not None:
            given[key] = _numbers(getattr(args, key), flags[key])
    labels = None
    if args.labels is not None:
        try:
            labels = read_labels(args.labels)
        except SalienceError as e:
            raise SalienceError(f"--labels: {e}") from None
    return Inputs(given, flags, labels)


def check_side(value: int, flag: str) -> int:
    """A square image's side given on the command line (``salience list / visualize --size``): an int >= 1 of at
    most :data:`~salience.loading.images.MAX_INPUT_PIXELS` pixels, else a :class:`SalienceError` naming ``flag``."""
    check_int(value, flag, minimum=1)
    check_input_pixels((value, value), flag)
    return value


def _split(text: str) -> list[str]:
    """The parts of ``H,W`` / ``HxW`` / ``H W``, one separator between two numbers: an empty part (``8,x``, ``8,,9``)
    is kept, so that it is refused (runs of separators were one, and ``--size 8,x`` was a silent 8 x 8)."""
    return re.split(r"\s*[,x]\s*|\s+", text.strip())


def _ints(text: str, flag: str, what: str, count: int = 2) -> tuple[int, ...]:
    parts = _split(text)
    try:
        values = tuple(int(t) for t in parts)
    except ValueError:
        values = ()
    if not 1 <= len(values) <= count or min(values) < 1:  # 0 and -5 were refused only once the model had loaded
        raise SalienceError(f"{flag} must be {what} (whole numbers >= 1), got {text!r}")
    return values


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if not values:
        raise SalienceError(f"{flag} must be numbers separated by commas, e.g. 0.485,0.456,0.406, got {text!r}")
    return values


def preprocessing_info(info: ModelInfo, inputs: Inputs) -> ModelInfo:
    """``info`` with the given preprocessing; a bad combination is an error naming its flag."""
    if not inputs.preprocessing:
        return info
    try:
        new = with_preprocessing(info, **inputs.preprocessing)
    except SalienceError as e:
        msg = str(e)
        named = [(m.start(), k) for k in inputs.preprocessing
                 for m in [re.search(rf"\b{re.escape(k)}\b", msg)] if m]
        flag = inputs.flags[min(named)[1]] if named else "preprocessing"
        raise SalienceError(f"{flag}: {msg}") from None
    given = [f"{inputs.flags[k]} {v if isinstance(v, (int, str)) else ','.join(map(str, v))}"
             for k, v in inputs.preprocessing.items() if k in ("size", "resize", "resize_mode", "channels")]
    check_static_input(info, new, " ".join(given) or "the preprocessing")
    return new


def check_static_input(info: ModelInfo, new: ModelInfo, given: str) -> None:
    """A :class:`SalienceError` when ``new`` (``info`` with the preprocessing flags ``given``) feeds the model
    another channel count or image size than the fixed ones of its ``info.extra["static_input"]`` (``(C, H, W)``, an
    int where fixed, ``None`` where free: a ``.pt2`` program exported with a static size). The program itself
    refuses such an input with torch's guard error, which the command said as an unexpected error (exit 3)."""
    check_size_bounds(info, new, given)
    fixed = info.extra.get("static_input")
    if not fixed:
        return
    c, h, w = fixed
    size = new.input_size
    channels_wrong = c is not None and new.channels != c
    size_wrong = (h is not None or w is not None) and (size is None or (h is not None and size[0] != h)
                                                      or (w is not None and size[1] != w))
    if not channels_wrong and not size_wrong:
        return
    shape = " x ".join("any" if v is None else str(v) for v in fixed)
    feeds = f"{new.channels} x " + ("each image's own size" if size is None else f"{size[0]} x {size[1]}")
    fix = "the program's own channels and size are used" if channels_wrong else (
        "the program's own size is used), or export it again with height and width dynamic (dynamic_shapes="
        "{'x': {0: Dim('batch'), 2: Dim('h'), 3: Dim('w')}}")
    raise SalienceError(f"{given}: {info.name} takes inputs of {shape} (channels x height x width) only, fixed when "
                        f"it was exported, and {given} would give it {feeds}; leave {given} out ({fix})")


def check_size_bounds(info: ModelInfo, new: ModelInfo, given: str) -> None:
    """A :class:`SalienceError` when ``new``'s input size ``(H, W)`` is outside the ranges of a ``.pt2`` program's
    dynamic height and width (``info.extra["size_bounds"]``, ``((h_min, h_max), (w_min, w_max))``, ``None`` for no
    bound: ``Dim("h", min=8, max=64)``): the program refuses it with torch's guard error, which the command said as
    an unexpected error (exit 3)."""
    said = sides_out_of_bounds(info, new.input_size) if new.input_size is not None else None
    if said is None:
        return
    raise SalienceError(f"{given}: {info.name} was exported with bounded dynamic sizes, and {given} would give it "
                        f"{said}; choose a size in range, or export it again with wider Dim(min=, max=)")


def class_names(info: ModelInfo, num_outputs: int, inputs: Inputs) -> tuple[ModelInfo, Optional[str]]:
    """``info`` with the model's class names, ``--labels``' or ImageNet-1k's, and which."""
    try:
        return name_classes(info, num_outputs, inputs.labels)
    except SalienceError as e:
        raise SalienceError(f"--labels: {e}") from None
