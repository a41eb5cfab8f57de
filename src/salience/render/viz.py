"""Pictures of saliency maps: colormaps, heatmaps, overlays, side-by-side figures, files.

numpy + pillow (and pure tensor code from ``salience._core``); never sees a model. Every function
accepts torch tensors (any device; they are detached and copied to the CPU) and numpy arrays alike
and gives the same picture for both.

Normalization is explicit and per image (the ``norm`` argument):

* ``"percentile"`` (default): values above the ``percentile``-th percentile (99: the top 1 %) are
  clipped before scaling, so a few extreme pixels do not wash the rest of the map out (a map whose
  percentile is its minimum, zero but for a few pixels, is scaled by its max so they still show);
* ``"minmax"``: the smallest value becomes the bottom colour and the largest the top one;
* ``None``: the values are used as they are; they must already lie in ``[0, 1]`` (``[-1, 1]`` for
  signed maps), else :class:`~salience.SalienceError` (no silent clipping).

A map with negative values is *signed* (auto-detected; force with ``signed=True/False``): it is
scaled symmetrically by its largest ``|value|`` (or that percentile of ``|value|``), zero lands
exactly on the middle colour of a diverging colormap (``"bwr"``: blue - white - red) and ``+a`` /
``-a`` get mirror colours. Unsigned maps use a sequential colormap (``"fire"``, dark to bright).
"""
from __future__ import annotations

import io as _io
import math
import numbers
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from salience._core.errors import SalienceError
from salience._core.files import atomic_path, atomic_write
from salience._core.tensors import unit_scale, check_flag, check_int, check_optional_flag

__all__ = [
    "COLORMAPS",
    "colormap",
    "scale",
    "heatmap",
    "colored",
    "grayscale",
    "overlay",
    "constant_value",
    "constant_map_note",
    "to_uint8_image",
    "figure",
    "save_png",
    "save_npy",
    "save_figure",
]

ArrayLike = Union[np.ndarray, "torch.Tensor"]
PathLike = Union[str, "os.PathLike[str]"]
Norm = Optional[str]

# ----------------------------------------------------------------------------- colormaps
# Compact anchors (position in [0, 1], RGB) interpolated linearly to 256 entries. Our own
# choices: "fire" rises monotonically in luminance (black - violet - red - orange - pale yellow),
# so brighter always means more; "bwr" is built from one half (white -> dark red) and its mirror
# image with red and blue swapped, so it is symmetric about the middle by construction.
_SEQUENTIAL: dict[str, tuple[tuple[float, tuple[int, int, int]], ...]] = {
    "fire": (
        (0.0, (0, 0, 0)),
        (0.2, (40, 10, 90)),
        (0.4, (120, 20, 110)),
        (0.6, (200, 50, 60)),
        (0.8, (245, 140, 20)),
        (1.0, (255, 250, 180)),
    ),
    "gray": ((0.0, (0, 0, 0)), (1.0, (255, 255, 255))),
}
_DIVERGING_HALF: dict[str, tuple[tuple[float, tuple[int, int, int]], ...]] = {
    "bwr": (
        (0.0, (255, 255, 255)),
        (0.35, (244, 170, 135)),
        (0.7, (214, 72, 58)),
        (1.0, (120, 0, 30)),
    ),
}
COLORMAPS: tuple[str, ...] = tuple(_SEQUENTIAL) + tuple(_DIVERGING_HALF)
_DEFAULT_SEQUENTIAL = "fire"
_DEFAULT_DIVERGING = "bwr"
_LUTS: dict[str, np.ndarray] = {}


def _interp(anchors: Sequence[tuple[float, tuple[int, int, int]]], n: int) -> np.ndarray:
    pos = np.array([a[0] for a in anchors], dtype=np.float64)
    rgb = np.array([a[1] for a in anchors], dtype=np.float64)
    t = np.linspace(0.0, 1.0, n)
    out = np.stack([np.interp(t, pos, rgb[:, c]) for c in range(3)], axis=1)
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def colormap(name: str) -> np.ndarray:
    """The colormap ``name`` (one of :data:`COLORMAPS`) as a ``(256, 3)`` uint8 lookup table.

    Sequential maps run from entry 0 (lowest) to 255 (highest). Diverging maps have their middle
    colour at entries 127 and 128 (zero) and ``lut[127 - k]`` is ``lut[128 + k]`` with red and blue
    swapped.
    """
    if not isinstance(name, str) or name not in COLORMAPS:
        raise SalienceError(f"unknown colormap {name!r}; expected one of {', '.join(COLORMAPS)}")
    if name not in _LUTS:
        if name in _SEQUENTIAL:
            lut = _interp(_SEQUENTIAL[name], 256)
        else:
            half = _interp(_DIVERGING_HALF[name], 128)        # middle (0) -> top (+max)
            lut = np.concatenate([half[::-1, ::-1], half])    # bottom half: mirrored, red<->blue
        lut.setflags(write=False)
        _LUTS[name] = lut
    return _LUTS[name].copy()


def _lut(cmap: Union[None, str, ArrayLike], signed: bool) -> np.ndarray:
    if cmap is None:
        return colormap(_DEFAULT_DIVERGING if signed else _DEFAULT_SEQUENTIAL)
    if isinstance(cmap, str):
        return colormap(cmap)
    lut = _as_array(cmap, "cmap")
    if lut.shape != (256, 3) or lut.dtype != np.uint8:
        raise SalienceError(
            f"cmap must be a colormap name ({', '.join(COLORMAPS)}) or a (256, 3) uint8 table, "
            f"got an array of shape {tuple(lut.shape)} and dtype {lut.dtype}"
        )
    return lut


# ----------------------------------------------------------------------------- inputs


def _as_array(x: object, what: str) -> np.ndarray:
    """A numpy view of a tensor (detached, on the CPU; bfloat16/half as float32) or array."""
    if _is_tensor(x):
        if getattr(x, "is_meta", False):
            raise SalienceError(f"{what} is a tensor on the 'meta' device, which holds no values; give the tensor "
                                "the method computed (on the CPU or a GPU)")
        if getattr(x, "layout", torch.strided) != torch.strided:
            raise SalienceError(f"{what} is a sparse tensor ({x.layout}); give a dense one: t.to_dense()")
        t = x.detach().cpu()
        if t.is_complex():
            raise SalienceError(f"{what} must be real, got a complex tensor")
        if t.dtype.is_floating_point and t.dtype.itemsize < 4:
            t = t.float()
        return t.numpy()
    try:
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - ragged lists and the like
        raise SalienceError(f"{what} must be a tensor or numpy array, got {type(x).__name__} ({e})") from None
    if a.dtype.kind not in "biuf":
        raise SalienceError(f"{what} must hold real numbers, got dtype {a.dtype} ({type(x).__name__})")
    return a


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    """``a`` as float64, refusing NaN/inf and empty arrays."""
    if a.size == 0:
        raise SalienceError(f"{what} is empty (shape {tuple(a.shape)}); expected at least one pixel")
    f = a.astype(np.float64, copy=False)
    bad = ~np.isfinite(f)
    if bad.any():
        raise SalienceError(
            f"{what} has {int(bad.sum())} NaN or infinite value(s) of {f.size}; a picture needs finite "
            "numbers (check the method's input and options, or replace them, e.g. np.nan_to_num)"
        )
    return f


def _not_channels_last(a: np.ndarray, what: str) -> None:
    """Refuse a map that reads as channels-last, ``(H, W, 1)`` / ``(H, W, 3)`` (Keras's, PIL's layout):
    read as channels-first it is a batch of H maps 1 or 3 pixels wide (or C = H channels), each row
    scaled on its own, which draws nonsense without a word. A map 1 or 3 pixels wide whose other two
    axes both exceed 4 is no real case."""
    if a.ndim >= 3 and a.shape[-1] in (1, 3) and a.shape[-2] > 4 and a.shape[-3] > 4:
        raise SalienceError(
            f"{what} of shape {tuple(a.shape)} looks channels-last (H, W, C); salience's maps are (H, W), "
            "(B, H, W) or per-channel (C, H, W): give m[..., 0] for (H, W, 1), or move the channels first "
            "(m.transpose(2, 0, 1) for an array, m.permute(2, 0, 1) for a tensor) for viz.colored / viz.grayscale; "
            "a batch of maps 1 or 3 pixels wide after all (a CAM of tall, narrow images): one map at a time, m[i]"
        )


def _is_number(x: object) -> bool:
    """A real number (numpy's included), not a bool (``True`` is not 1 %) nor a string."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_tensor(x: object) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")


# ----------------------------------------------------------------------------- scaling


def _scale(a: np.ndarray, norm: Norm, percentile: float, signed: Optional[bool], what: str) -> tuple[np.ndarray, bool]:
    """Scale ``a`` (batch on axis 0, everything else is one image) to [0, 1] or, signed, [-1, 1]."""
    if norm not in ("percentile", "minmax", None):
        raise SalienceError(f"norm must be 'percentile', 'minmax' or None, got {norm!r}")
    if norm == "percentile" and not (_is_number(percentile) and 0 < percentile <= 100):
        raise SalienceError(f"percentile must be a number in (0, 100], got {percentile!r}")
    if signed is None:
        signed = bool((a < 0).any())
    if norm is None:
        lo = -1.0 if signed else 0.0
        if a.min() < lo or a.max() > 1.0:
            raise SalienceError(
                f"norm=None needs {what} values in [{lo:g}, 1] already, got [{a.min():.4g}, {a.max():.4g}]; "
                "pass norm='percentile' or 'minmax' to scale it"
            )
        return a.astype(np.float64), signed
    flat = a.reshape(a.shape[0], -1)
    if signed:
        mag = np.abs(flat)
        top = mag.max(axis=1)
        s = np.percentile(mag, percentile, axis=1) if norm == "percentile" else top
        s = np.where(s > 0, s, top)                      # a mostly-zero map: fall back to the max
        s = np.where(s > 0, s, 1.0)                      # an all-zero map stays zero (middle colour)
        out = np.clip(flat / s[:, None], -1.0, 1.0)
    else:  # the one per-sample [0, 1] scaling (reduce.normalize's too), on a float64 view of the array
        out = unit_scale(torch.from_numpy(np.require(flat, np.float64, ["C", "W"])),
                         percentile if norm == "percentile" else None).numpy()
    return out.reshape(a.shape), signed


def scale(m: ArrayLike, norm: Norm = "percentile", *, percentile: float = 99.0,
          signed: Optional[bool] = None) -> np.ndarray:
    """Scale a map for display, per image: float64 in ``[0, 1]``, or ``[-1, 1]`` when signed.

    ``m`` is one map ``(H, W)`` or a batch ``(B, ...)`` (each ``m[i]`` is scaled on its own, all of
    its channels together). ``norm``: ``"percentile"`` (clip above the ``percentile``-th percentile,
    then min-max; signed maps: divide by that percentile of ``|m|``), ``"minmax"``, or ``None``
    (values must already lie in range; else an error). ``signed=None`` means "signed if any value
    is negative" (decided over the whole input, so a batch shares one scheme); signed scaling is
    symmetric and keeps 0 at 0. A constant map scales to 0.
    """
    signed = check_optional_flag(signed, "signed")
    a = _finite(_as_array(m, "map"), "map")
    if a.ndim < 2:
        raise SalienceError(f"map must be (H, W) or a batch (B, H, W) / (B, C, H, W), got shape {tuple(a.shape)}")
    _not_channels_last(a, "the map")
    one = a.ndim == 2
    out, _ = _scale(a[None] if one else a, norm, percentile, signed, "map")
    return out[0] if one else out


def constant_value(m: ArrayLike) -> Optional[float]:
    """The one value of a map that holds a single value everywhere (all zero included), else ``None``.

    The criterion is exact: every value equal to every other. Such a map has nothing to show: its
    picture is one flat colour (:func:`scale` maps it to 0). A map with NaN or infinite values is
    not constant here (a picture refuses it with its own error). Any shape; a per-channel map
    counts all its channels.
    """
    a = _as_array(m, "map")
    if a.size == 0:
        return None
    f = a.astype(np.float64, copy=False)
    lo, hi = float(f.min()), float(f.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo != hi:
        return None
    return lo + 0.0  # -0.0 -> 0.0


def constant_map_note(m: ArrayLike, *, what: str = "map") -> Optional[str]:
    """What to tell a user shown map ``m`` when it is constant (:func:`constant_value`), else ``None``.

    The one text of the command line and the explorer: that the map is constant (zero) everywhere,
    so its flat picture is a fact about the model and target, not a drawing bug; the likely causes
    and what to try. The library's methods return the raw values and say nothing. ``what`` names
    the thing shown (``"class model image"``: ``salience visualize``'s, which the same causes leave
    at its flat start).
    """
    v = constant_value(m)
    if v is None:
        return None
    if v == 0.0:
        return (f"the {what} is constant (zero) everywhere, so its picture is one flat colour: the score explained "
                "does not depend on the input at this layer / target. Likely causes: random weights with a "
                "zero-initialised head (e.g. an untrained timm or Hugging Face model), activations that die out "
                "(a dead ReLU layer for a CAM), a model in training mode, a target whose score ignores the input. "
                "Try another layer or target, and check the weights")
    return (f"the {what} is constant ({v:.4g}) everywhere, so its picture is one flat colour: every pixel counts "
            "the same (e.g. a CAM of a layer whose grid is 1 x 1, or a score that depends on the input only "
            "through a sum of all its pixels). Try another layer or target, and check the weights")


def _index(v: np.ndarray, signed: bool) -> np.ndarray:
    """Scaled values -> LUT indices. Unsigned [0, 1] -> 0..255; signed [-1, 1] -> 0 at 128, +a at
    128 + k and -a at 127 - k (mirror entries), +1 at 255 and -1 at 0."""
    if not signed:
        return np.floor(v * 255.0 + 0.5).astype(np.intp)
    k = np.floor(np.abs(v) * 127.0 + 0.5).astype(np.intp)
    return np.where(v >= 0, 128 + k, 127 - k)


# ----------------------------------------------------------------------------- maps -> RGB


def heatmap(m: ArrayLike, *, cmap: Union[None, str, ArrayLike] = None, norm: Norm = "percentile",
            percentile: float = 99.0, signed: Optional[bool] = None) -> np.ndarray:
    """A map in colour: ``(H, W)`` -> uint8 ``(H, W, 3)``, or a batch ``(B, H, W)`` -> ``(B, H, W, 3)``.

    Scaled per image by ``norm`` (see :func:`scale`). ``cmap``: a name from :data:`COLORMAPS` or a
    ``(256, 3)`` uint8 table; default ``"bwr"`` for signed maps (0 is white), ``"fire"`` otherwise.
    Per-channel maps ``(C, H, W)`` go through :func:`colored` or :func:`grayscale` instead.
    """
    signed = check_optional_flag(signed, "signed")
    a = _finite(_as_array(m, "map"), "map")
    if a.ndim not in (2, 3):
        raise SalienceError(
            f"heatmap expects one map (H, W) or a batch (B, H, W), got shape {tuple(a.shape)}; "
            "for per-channel maps use viz.colored (RGB) or viz.grayscale"
        )
    _not_channels_last(a, "the map")
    one = a.ndim == 2
    v, sig = _scale(a[None] if one else a, norm, percentile, signed, "map")
    rgb = _lut(cmap, sig)[_index(v, sig)]
    return rgb[0] if one else rgb


def _colored_scaled(v: np.ndarray, signed: bool) -> np.ndarray:
    """Scaled ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)``; signed values put 0 at mid-gray (128)."""
    u = (v + 1.0) / 2.0 if signed else v
    return np.floor(u * 255.0 + 0.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def colored(m: ArrayLike, *, norm: Norm = "percentile", percentile: float = 99.0,
            signed: Optional[bool] = None) -> np.ndarray:
    """A per-channel map shown as RGB ("colored vanilla backprop"): ``(3, H, W)`` -> uint8
    ``(H, W, 3)``, or ``(B, 3, H, W)`` -> ``(B, H, W, 3)``.

    The three channels of an image are scaled together (so their balance, the hue, is kept).
    Unsigned: 0 is black. Signed: symmetric, 0 is mid-gray, positive brighter, negative darker.
    """
    signed = check_optional_flag(signed, "signed")
    a = _finite(_as_array(m, "map"), "map")
    if a.ndim not in (3, 4) or a.shape[-3] != 3:
        raise SalienceError(
            f"colored expects a per-channel map (3, H, W) or (B, 3, H, W), got shape {tuple(a.shape)}; "
            "single-channel maps go through viz.heatmap"
        )
    one = a.ndim == 3
    v, sig = _scale(a[None] if one else a, norm, percentile, signed, "map")
    rgb = _colored_scaled(v, sig)
    return rgb[0] if one else rgb


def grayscale(m: ArrayLike, *, norm: Norm = "percentile", percentile: float = 99.0,
              cmap: Union[str, ArrayLike] = "gray") -> np.ndarray:
    """The grayscale version of a per-channel map: ``sum_c |m_c|``, scaled, in ``cmap`` (gray).

    ``(C, H, W)`` -> uint8 ``(H, W, 3)``; ``(B, C, H, W)`` -> ``(B, H, W, 3)``.
    """
    a = _finite(_as_array(m, "map"), "map")
    if a.ndim not in (3, 4):
        raise SalienceError(
            f"grayscale expects a per-channel map (C, H, W) or (B, C, H, W), got shape {tuple(a.shape)}; "
            "a map (H, W) is already single-channel: use viz.heatmap(m, cmap='gray')"
        )
    _not_channels_last(a, "the map")
    return heatmap(np.abs(a).sum(axis=-3), cmap=cmap, norm=norm, percentile=percentile, signed=False)


# ----------------------------------------------------------------------------- images


def _one_image(a: np.ndarray, tensor: bool) -> np.ndarray:
    """One image array -> uint8 (H, W, 3)."""
    shape = tuple(a.shape)
    if a.ndim == 2:
        a = a[..., None]
    elif a.ndim == 3:
        first, last = a.shape[0] in (1, 3, 4), a.shape[-1] in (1, 3, 4)
        if first and last:  # e.g. 3x5x3: tensors and float arrays are (C, H, W); uint8 arrays (H, W, C)
            first = tensor or a.dtype != np.uint8
        if first:
            a = a.transpose(1, 2, 0)
        elif not last:
            raise SalienceError(
                f"an image must be (C, H, W) or (H, W, C) with 1, 3 or 4 channels, got shape {tuple(a.shape)}"
            )
    else:
        raise SalienceError(f"an image must be (C, H, W), (H, W, C) or (H, W), got shape {tuple(a.shape)}")
    a = a[..., :3] if a.shape[-1] == 4 else a  # RGBA: drop alpha
    one_channel = a.shape[-1] == 1
    if one_channel:
        a = np.repeat(a, 3, axis=-1)
    if a.size == 0:
        raise SalienceError(f"the image is empty (shape {tuple(a.shape)})")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "b":
        raise SalienceError("an image must be numbers (uint8 0..255 or float 0..1), got booleans")
    if a.dtype.kind in "iu":
        return _integer_pixels(a, one_channel, shape)
    f = _finite(a, "image")
    lo, hi = float(f.min()), float(f.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise SalienceError(
            f"a float image must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; un-normalize it first "
            "(salience.loading.unnormalize for a model's mean/std) or divide 0..255 values by 255"
        )
    return np.floor(f.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _integer_pixels(a: np.ndarray, one_channel: bool, shape: tuple[int, ...]) -> np.ndarray:
    """An integer array other than uint8 ``(H, W, 3)`` as pixels 0..255 (matplotlib's convention for integer RGB),
    or a SalienceError where it reads as something else: one channel (a map's shape: a label map, an ``argmax``, an
    integer saliency map; gray pixels are uint8), or only 0 and 1 (a mask, a [0, 1] image cast to integers). Each
    was drawn as 8-bit pixels, nearly black, without a word."""
    lo, hi = a.min(), a.max()
    if one_channel:
        pixels = ("gray pixels 0..255 are uint8: m.astype(np.uint8) (a tensor: m.to(torch.uint8))" if 0 <= lo and hi <= 255
                  else f"its values [{lo}, {hi}] are not 8-bit pixels (uint8 would wrap them): a 16-bit gray image is "
                       "float in [0, 1]: m / 65535 (its white; salience.loading.load_image reads 16-bit files so)")
        raise SalienceError(
            f"a one-channel integer array of dtype {a.dtype}, shape {shape}, is read as a map (a label map, an argmax, "
            "an integer saliency map), not as pixels. Draw a map with viz.heatmap(m.astype(float)) (a tensor: "
            f"m.float()); {pixels}"
        )
    if lo < 0 or hi > 255:
        raise SalienceError(f"an integer image must lie in 0..255, got [{lo}, {hi}]; use uint8 or float in [0, 1]")
    if hi <= 1:
        raise SalienceError(
            f"an integer image (dtype {a.dtype}) holds only 0 and 1 (a mask, or a float image in [0, 1] cast to "
            "integers), which as pixels 0..255 is black: give a [0, 1] image as float (x.float(), not x.long()), "
            "pixels as uint8 0..255 (a mask: x * 255)"
        )
    return a.astype(np.uint8)


def to_uint8_image(x: ArrayLike) -> np.ndarray:
    """An image for display: uint8 ``(H, W, 3)``; a batch (4-D) gives ``(B, H, W, 3)``.

    Accepts ``(C, H, W)`` with C = 1, 3 or 4 (torch layout), ``(H, W, C)`` (PIL/numpy layout),
    ``(H, W)`` gray; uint8 (0..255) or float in ``[0, 1]`` (values outside by more than 0.001 are
    an error: un-normalize first). Where both layouts fit (e.g. ``(3, 5, 3)``), tensors and float
    arrays are read as ``(C, H, W)``, uint8 numpy arrays as ``(H, W, C)``. Other integer dtypes: RGB(A)
    pixels 0..255 (matplotlib's convention); one channel (a map's shape: draw a map with :func:`heatmap`)
    or only 0 and 1 (a mask, a [0, 1] image cast to integers) are refused: either was nearly black.
    """
    tensor = _is_tensor(x)
    a = _as_array(x, "image")
    if a.ndim == 4:
        if a.shape[0] == 0:
            raise SalienceError("the image batch is empty (B = 0)")
        return np.stack([_one_image(a[i], tensor) for i in range(a.shape[0])])
    return _one_image(a, tensor)


def _resize(a: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """Resize float (H, W) values or uint8 (H, W, 3) pixels to ``size`` = (H, W) with pillow.

    Float maps: bilinear (stays within the input's range). Pixels: nearest when enlarging (keeps
    small images crisp), box averaging when shrinking."""
    from PIL import Image

    h, w = size
    if a.shape[:2] == (h, w):
        return a
    if a.dtype == np.uint8:
        enlarge = h >= a.shape[0] and w >= a.shape[1]
        img = Image.fromarray(np.ascontiguousarray(a)).resize((w, h), Image.NEAREST if enlarge else Image.BOX)
        return np.asarray(img)
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    out = np.asarray(img.resize((w, h), Image.BILINEAR if smooth else Image.NEAREST), dtype=np.float64)
    return np.clip(out, a.min(), a.max())


def _check_fits(hw: tuple[int, int], size: tuple[int, int], what: str) -> None:
    """Refuse a map ``hw`` that no one scale factor takes to the image's ``size``: stretching it would
    draw each value somewhere else (a transposed map, another image's map). A map of the same shape at
    a lower resolution fits: up to a pixel of rounding per side (a CAM's 7 x 10 on 224 x 300) and a
    border lost on both axes alike, at most half the shorter side (unpadded convolutions: a valid-conv
    CNN's 47 x 15 on 100 x 37, ``(H - r) / s``, as Grad-CAM's own upsampling stretches it)."""
    (h, w), (ih, iw) = hw, size
    # With u = 1 / s and v = r / s: v >= a u + b for each of ``lows``, v <= a u + b for each of ``highs``.
    lows = [(ih, -h - 1.0), (iw, -w - 1.0), (0.0, 0.0)]
    highs = [(ih, 1.0 - h), (iw, 1.0 - w), (min(ih, iw) / 2, 0.0)]
    lines = lows + highs

    def slack(u: float) -> float:  # concave in u: its largest value is at a kink or as u -> 0
        return min(a * u + b for a, b in highs) - max(a * u + b for a, b in lows)

    kinks = [(b2 - b1) / (a1 - a2) for i, (a1, b1) in enumerate(lines) for a2, b2 in lines[i + 1:] if a1 != a2]
    if max(slack(u) for u in [1e-12, *kinks] if u > 0) < -1e-9:
        raise SalienceError(
            f"{what} of {h} x {w} does not fit the image of {ih} x {iw}: its aspect ratio differs, so stretching "
            "it would put each value on other pixels (a transposed map? another image's map?); give the map "
            "made for this image, e.g. m.T for a transposed one, or resize the image to the map's shape (a map "
            "that is this image's all the same: resize it to the image first, torch.nn.functional.interpolate)"
        )


def _map_tiles(m: np.ndarray, size: tuple[int, int], *, cmap, norm: Norm, percentile: float,
               signed: Optional[bool], what: str = "the map") -> np.ndarray:
    """Maps ``(B, H', W')`` or colored ``(B, 3, H', W')`` -> uint8 ``(B, H, W, 3)`` at ``size``:
    scaled on the raw map, then resized (bilinear), then coloured."""
    _check_fits(m.shape[-2:], size, what)
    v, sig = _scale(m, norm, percentile, signed, "map")
    if v.ndim == 4:
        v = np.stack([np.stack([_resize(c, size) for c in img]) for img in v])
        return _colored_scaled(v, sig)
    v = np.stack([_resize(img, size) for img in v])
    return _lut(cmap, sig)[_index(v, sig)]


def _blend(image: np.ndarray, tile: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * tile.astype(np.float64)
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def _check_alpha(alpha: float) -> float:
    if not _is_number(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise SalienceError(f"alpha must be a number in [0, 1] (0: only the image, 1: only the map), got {alpha!r}")
    return float(alpha)


def overlay(image: ArrayLike, m: ArrayLike, *, alpha: float = 0.5, cmap: Union[None, str, ArrayLike] = None,
            norm: Norm = "percentile", percentile: float = 99.0, signed: Optional[bool] = None) -> np.ndarray:
    """The map's heatmap blended on the image: ``(1 - alpha) * image + alpha * heatmap``, uint8.

    ``image``: ``(3, H, W)`` / ``(1, H, W)`` float in [0, 1] or uint8 ``(H, W, 3)`` (see
    :func:`to_uint8_image`); ``m``: ``(h, w)``, or a per-channel ``(3, h, w)`` shown as RGB
    (:func:`colored`); a map smaller than the image (a low-res CAM) is scaled, then upsampled
    bilinearly. A batch of images ``(B, C, H, W)`` with maps ``(B, h, w)`` / ``(B, 3, h, w)``
    gives ``(B, H, W, 3)``; one image gives ``(H, W, 3)``. ``alpha`` 0 returns the image, 1 the
    heatmap.
    """
    signed = check_optional_flag(signed, "signed")
    alpha = _check_alpha(alpha)
    img = to_uint8_image(image)
    one = img.ndim == 3
    imgs = img[None] if one else img
    a = _finite(_as_array(m, "map"), "map")
    want = 2 if one else 3
    if a.ndim == want + 1 and a.shape[-3] == 1:
        a = a[..., 0, :, :]
    if one:
        a = a[None]
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[1] != 3) or a.shape[0] != imgs.shape[0]:
        raise SalienceError(
            f"overlay expects a map (h, w) or (3, h, w) for one image, (B, h, w) or (B, 3, h, w) for a batch "
            f"of B images; got image {tuple(np.shape(image))} and map {tuple(np.shape(m))}"
        )
    tiles = _map_tiles(a, imgs.shape[1:3], cmap=cmap, norm=norm, percentile=percentile, signed=signed)
    out = _blend(imgs, tiles, alpha)
    return out[0] if one else out


# ----------------------------------------------------------------------------- figures

_BG = 255
_FG = (0, 0, 0)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _fit(draw, text: str, width: int, font) -> str:
    """``text`` cut (with '..') to fit ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "..", font)[0] > width:
        text = text[:-1]
    return text + ".." if text else ""


def _figure_maps(maps: Mapping[str, ArrayLike], n: int) -> list[tuple[str, np.ndarray]]:
    if not isinstance(maps, Mapping):
        raise SalienceError(f"maps must be a mapping {{method name: maps}}, got {type(maps).__name__}")
    out = []
    for name, m in maps.items():
        a = _finite(_as_array(m, f"map {name!r}"), f"map {name!r}")
        if n == 1 and a.ndim in (2, 3) and (a.ndim == 2 or a.shape[0] in (1, 3)):
            a = a[None]  # one image: (H, W) or a per-channel (C, H, W)
        if a.ndim == 4:
            if a.shape[1] == 1:
                a = a[:, 0]
            elif a.shape[1] != 3:
                a = np.abs(a).max(axis=1)  # C channels that are not RGB: the largest magnitude
        if a.ndim not in (3, 4) or a.shape[0] != n:
            raise SalienceError(
                f"map {name!r}: expected (B, H, W) or (B, C, H, W) with B = {n} (one per image), "
                f"got shape {tuple(np.shape(m))}"
            )
        out.append((str(name), a))
    return out


def figure(images: Union[ArrayLike, Sequence[ArrayLike]], maps: Mapping[str, ArrayLike], *,
           norm: Norm = "percentile", percentile: float = 99.0, overlay: bool = True, alpha: float = 0.5,
           cmap: Union[None, str, ArrayLike] = None, signed: Optional[bool] = None,
           titles: Optional[Sequence[str]] = None, row_labels: Optional[Sequence[str]] = None,
           scale_to: Union[None, int, tuple[int, int]] = None, labels: bool = True, pad: int = 4) -> np.ndarray:
    """The side-by-side figure: one row per image; columns: the image, then for each method its
    map and (if ``overlay``) the map blended on the image. Returns uint8 ``(H, W, 3)``.

    ``images``: ``(B, C, H, W)`` (or ``(B, H, W, C)`` uint8, a sequence of images, or one image);
    ``maps``: ``{method name: (B, h, w) maps}``; per-channel ``(B, 3, h, w)`` maps are shown as RGB
    (:func:`colored`), ``(B, 1, h, w)`` as a single channel, other channel counts by their largest
    ``|value|``. Maps of another size than the images (a low-res CAM) are resized to them. Each map
    is scaled per image by ``norm``; signedness (``signed=None``: auto) is decided per method over
    its whole batch so a column uses one colour scheme. ``titles`` replace the method names in the
    header, ``row_labels`` (one per image) add a left margin. ``scale_to``: tile height in pixels
    (int, width kept in proportion) or ``(h, w)``; small images are enlarged without smoothing.
    ``labels=False`` draws no text; else a map that is one value everywhere (:func:`constant_value`,
    all zero included), drawn as one flat colour, says ``constant V`` on its tile. Layout: tiles of equal size with ``pad`` white pixels between
    them and around the edge, below a header line of text.
    """
    overlay = check_flag(overlay, "overlay")
    labels = check_flag(labels, "labels")
    signed = check_optional_flag(signed, "signed")
    alpha = _check_alpha(alpha)
    imgs = _figure_images(images)
    n, h, w = imgs.shape[:3]
    methods = _figure_maps(maps, n)
    titles = _names(titles, [name for name, _ in methods], "titles", "method")
    row_labels = None if row_labels is None else _names(row_labels, None, "row_labels", "image", n)
    pad = check_int(pad, "pad", what="white pixels between the tiles")
    th, tw = _tile_size(scale_to, h, w)
    _check_canvas(n, 1 + len(methods) * (2 if overlay else 1), th, tw, pad)

    # Columns of tiles, each (n, th, tw, 3).
    columns: list[np.ndarray] = [np.stack([_resize(im, (th, tw)) for im in imgs])]
    notes: list[tuple[int, int, str]] = []  # (column, row, text): a constant map's tile says so
    for name, a in methods:
        heat = _map_tiles(a, (h, w), cmap=cmap, norm=norm, percentile=percentile, signed=signed,
                          what=f"map {name!r}")
        notes += [(len(columns), r, f"constant {v:.3g}") for r, v in enumerate(map(constant_value, a))
                  if v is not None]
        cols = [heat] + ([_blend(imgs, heat, alpha)] if overlay else [])
        columns += [np.stack([_resize(t, (th, tw)) for t in c]) for c in cols]
    if not labels:
        return _canvas(columns, 0, 0, pad)
    return _labelled(columns, titles, row_labels, 2 if overlay else 1, pad, notes)


def _figure_images(images: Union[ArrayLike, Sequence[ArrayLike]]) -> np.ndarray:
    """The figure's images as uint8 ``(n, H, W, 3)``."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise SalienceError("images is an empty sequence; expected at least one image")
        items = [to_uint8_image(i) for i in images]
        if len({i.shape for i in items}) > 1:
            raise SalienceError(
                f"images: the images of a figure must share one size, got {sorted({i.shape[:-1] for i in items})} "
                "(H, W); resize them to one size first (or make one figure per size)"
            )
        imgs = np.stack(items)
        if imgs.ndim != 4:
            raise SalienceError("images: each item of the sequence must be one image (C, H, W) or (H, W, C)")
        return imgs
    imgs = to_uint8_image(images)
    return imgs[None] if imgs.ndim == 3 else imgs


def _names(given: Optional[Sequence[str]], default: Optional[list[str]], what: str, per: str,
           n: Optional[int] = None) -> list[str]:
    """``given`` labels as strings, one per ``per`` (``n`` of them, or as many as ``default``)."""
    if given is None:
        assert default is not None
        return default
    if isinstance(given, (str, bytes)):
        raise SalienceError(f"{what} must be a list of strings (one per {per}), not one string: {given!r:.60}; "
                            f"give [{given!r:.60}]")
    if not isinstance(given, Iterable):
        raise SalienceError(f"{what} must be a list of strings (one per {per}), got {type(given).__name__}")
    names = [_label(t) for t in given]
    want = n if n is not None else len(default or [])
    if len(names) != want:
        raise SalienceError(f"{what}: expected {want} (one per {per}), got {len(names)}")
    return names


def _label(t: object) -> str:
    """A title or row label as text: ``None`` is none, a 0-d tensor or array its value (a class index)."""
    if t is None:
        return ""
    if getattr(t, "ndim", None) == 0 and hasattr(t, "item"):
        t = t.item()
    return str(t)


def _tile_size(scale_to: Union[None, int, tuple[int, int]], h: int, w: int) -> tuple[int, int]:
    if scale_to is None:
        return h, w
    if _is_count(scale_to):
        return int(scale_to), max(1, round(w * int(scale_to) / h))
    if isinstance(scale_to, (tuple, list)) and len(scale_to) == 2 and all(_is_count(s) for s in scale_to):
        return int(scale_to[0]), int(scale_to[1])
    raise SalienceError(f"scale_to must be a positive int (tile height) or (height, width), got {scale_to!r}")


def _check_canvas(rows: int, cols: int, th: int, tw: int, pad: int) -> None:
    """Refuse a figure over PIL's ``MAX_IMAGE_PIXELS`` (89 megapixels: PIL warns about opening it and
    refuses twice that), before its tiles are made (``pad=10000``: a 3.6 GB canvas)."""
    from PIL import Image

    cap = Image.MAX_IMAGE_PIXELS or 89_478_485
    ch, cw = rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad
    if ch * cw > cap:
        raise SalienceError(
            f"the figure would be {cw} x {ch} pixels ({ch * cw / 1e6:.0f} megapixels), over the {cap / 1e6:.0f} "
            f"megapixels an image viewer (PIL's MAX_IMAGE_PIXELS) opens; give a smaller scale_to (tiles of "
            f"{th} x {tw}) or pad ({pad}), or fewer images or methods per figure"
        )


def _is_count(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) and x > 0


def _canvas(columns: list[np.ndarray], header: int, left: int, pad: int) -> np.ndarray:
    """Tiles ``columns`` (each ``(n, th, tw, 3)``) on a white canvas, ``pad`` apart, below ``header``."""
    n, th, tw = columns[0].shape[:3]
    ncol = len(columns)
    canvas = np.full((header + n * th + (n + 1) * pad, left + ncol * tw + (ncol + 1) * pad, 3), _BG, dtype=np.uint8)
    for c, col in enumerate(columns):
        x = left + pad + c * (tw + pad)
        for r in range(n):
            y = header + pad + r * (th + pad)
            canvas[y:y + th, x:x + tw] = col[r]
    return canvas


def _labelled(columns: list[np.ndarray], titles: list[str], row_labels: Optional[list[str]], per_method: int,
              pad: int, notes: Sequence[tuple[int, int, str]] = ()) -> np.ndarray:
    """The canvas with a header line (``image``, then each method's title over its columns),
    ``row_labels`` in a left margin, and ``notes`` ``(column, row, text)`` on tiles (top left, black
    on a white box)."""
    from PIL import Image, ImageDraw

    n, th, tw = columns[0].shape[:3]
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(_text_size(probe, "Ag|", font)[1], 1)
    header = text_h + pad + 2
    left = (max(_text_size(probe, t, font)[0] for t in row_labels) + pad) if row_labels else 0
    pic = Image.fromarray(_canvas(columns, header, left, pad))
    draw = ImageDraw.Draw(pic)

    def label(text: str, x0: int, span: int, y: int) -> None:
        text = _fit(draw, text, span, font)
        tw_, _ = _text_size(draw, text, font)
        bx = draw.textbbox((0, 0), text, font=font)
        draw.text((x0 + (span - tw_) // 2 - bx[0], y - bx[1]), text, fill=_FG, font=font)

    label("image", left + pad, tw, pad)
    for i, t in enumerate(titles):
        x0 = left + pad + (1 + i * per_method) * (tw + pad)
        label(t, x0, per_method * tw + (per_method - 1) * pad, pad)
    for r, t in enumerate(row_labels or []):
        y = header + pad + r * (th + pad) + (th - text_h) // 2
        bx = draw.textbbox((0, 0), t, font=font)
        draw.text((pad // 2 - bx[0], y - bx[1]), t, fill=_FG, font=font)
    for c, r, t in notes:
        x, y = left + pad + c * (tw + pad), header + pad + r * (th + pad)
        t = _fit(draw, t, tw - 4, font)
        bx = draw.textbbox((0, 0), t, font=font)
        draw.rectangle((x, y, x + bx[2] - bx[0] + 3, y + text_h + 3), fill=(_BG,) * 3)
        draw.text((x + 2 - bx[0], y + 2 - bx[1]), t, fill=_FG, font=font)
    return np.asarray(pic).copy()


# ----------------------------------------------------------------------------- files


def save_png(path: PathLike, array: ArrayLike) -> Path:
    """Write a picture as PNG, atomically; returns the path.

    uint8 ``(H, W)`` is saved as gray, ``(H, W, 3)`` as RGB, ``(H, W, 4)`` as RGBA, exactly; any
    other image :func:`to_uint8_image` accepts (a float ``(3, H, W)`` tensor...) is converted first.
    ``path`` ends in ``.png`` (any case): a ``.jpg`` or suffix-less name, which would hold PNG bytes
    under another format's name, is refused.
    """
    from PIL import Image

    _check_png_name(path)
    a = _as_array(array, "picture")
    if not (a.dtype == np.uint8 and not _is_tensor(array)
            and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)))):
        if a.ndim == 4:
            raise SalienceError(f"save_png writes one picture per file, got a batch of shape {tuple(a.shape)}")
        a = to_uint8_image(array)
    if a.size == 0:
        raise SalienceError(f"the picture is empty (shape {tuple(a.shape)})")
    buf = _io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def _check_png_name(path: PathLike) -> None:
    if isinstance(path, (str, os.PathLike)) and not isinstance(os.fspath(path), bytes) \
            and Path(path).suffix.lower() != ".png":
        raise SalienceError(f"save_png writes PNG files; give a file name ending in .png, got {os.fspath(path)!r} "
                            "(for another format: PIL.Image.fromarray(picture).save(path))")


def save_npy(path: PathLike, m: ArrayLike) -> Path:
    """Write a raw map (tensor or array, unscaled) as ``.npy``, atomically; returns the path.

    bfloat16/half tensors are stored as float32 (numpy has no bfloat16). No pickling.
    """
    a = _as_array(m, "map")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(a), allow_pickle=False)
    return Path(os.fspath(path))


def save_figure(path: PathLike, images: Union[ArrayLike, Sequence[ArrayLike]], maps: Mapping[str, ArrayLike],
                **options) -> Path:
    """:func:`figure` written as PNG (atomically) to ``path`` (a ``.png`` name); ``options`` go to :func:`figure`."""
    _check_png_name(path)  # before the figure is drawn
    return save_png(path, figure(images, maps, **options))
