"""Synthetic "shapes" images with ground-truth masks, for demos and for testing saliency.

Each image shows one flat-coloured shape (:data:`CLASSES`) of random size, rotation, colour and
position on a textured background (smooth noise, stripes, a gradient) with clutter (line segments
and dots, none of them one of the five shapes). The mask is exactly the set of pixels painted with
the shape's colour, so a saliency map can be scored against it.

Everything is drawn from a per-image random stream seeded by ``(seed, index)``: the result does
not depend on the global RNG, and a longer draw starts with a shorter one
(``shapes(10, s)[0][:5]`` equals ``shapes(5, s)[0]``).

The ``cue`` option adds a small checkerboard mark in a class-specific slot along the top border
(never overlapping the shape; the shape always stays below that band). A model trained with
``cue="train"`` can solve the task by the mark alone ("Clever Hans"); ``cue="moved"`` puts the mark
of a wrong class, which exposes such a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from salience._core.errors import SalienceError
from salience._core.tensors import check_int

__all__ = ["CLASSES", "CUES", "ShapesBatch", "shapes", "shapes_batch", "cue_box"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
"""Class names; the label of an image is an index into this tuple."""

CUES: tuple[Optional[str], ...] = (None, "train", "moved")
"""Accepted values of ``cue``."""

# Geometry in units of a 64-pixel image (scaled to ``size``).
_R_MIN, _R_MAX = 8.0, 19.0  # circumradius of the shape, pixels at size 64
_BAND = 10.0  # the top band (rows 0.._BAND) holds the cue slots; the shape stays below it
_CUE = 6.0  # cue mark side
_MARGIN = 1.0  # shape keeps this many pixels from the other borders
_N_LINES, _N_DOTS = 4, 8  # most clutter items per image
_N_COLOUR_TRIES = 8

# Uniform draws per image, laid out in this order (one ``rng.random(_D)`` call per image).
_LAYOUT = (
    ("label", 1), ("radius", 1), ("angle", 1), ("cx", 1), ("cy", 1), ("wrong", 1),
    ("bg", 3), ("bg2", 3), ("noise", 3 * 5 * 5), ("tex", 6),
    ("fg", 3 * _N_COLOUR_TRIES),
    ("n_lines", 1), ("lines", 8 * _N_LINES),
    ("n_dots", 1), ("dots", 6 * _N_DOTS),
)
_SLICES: dict[str, slice] = {}
_pos = 0
for _name, _k in _LAYOUT:
    _SLICES[_name] = slice(_pos, _pos + _k)
    _pos += _k
_D = _pos
del _pos, _name, _k


@dataclass(frozen=True)
class ShapesBatch:
    """A batch of shapes images and everything known about them.

    ``images``: float32 ``(n, 3, H, W)`` in ``[0, 1]``. ``labels``: int64 ``(n,)`` indices into
    :data:`CLASSES`. ``masks``: bool ``(n, H, W)``, the shape's pixels. ``scale``: float32
    ``(n,)`` the shape's size (circumscribed diameter / image side), in ``[0, 1]``. ``center``:
    float32 ``(n, 2)`` the shape's centre ``(x, y)`` as a fraction of the image side.
    ``cue_masks``: bool ``(n, H, W)``, the cue mark's pixels (all False with ``cue=None``).
    ``cue_labels``: int64 ``(n,)`` the class whose slot holds the mark (``-1`` with no cue).
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    scale: torch.Tensor
    center: torch.Tensor
    cue_masks: torch.Tensor
    cue_labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def shapes(
    n: int, seed: int = 0, *, size: int = 64, cue: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` shapes images: ``(images (n, 3, H, W) float in [0, 1], labels (n,) int64, masks
    (n, H, W) bool)``. See :func:`shapes_batch` for the options and the other fields."""
    b = shapes_batch(n, seed, size=size, cue=cue)
    return b.images, b.labels, b.masks


def cue_box(label: int, size: int = 64) -> tuple[int, int, int, int]:
    """The cue slot of class ``label`` as ``(top, left, height, width)`` pixels."""
    side = max(2, round(_CUE * size / 64))
    top = max(1, round(2 * size / 64))
    slot = size / len(CLASSES)
    left = int(round((label + 0.5) * slot - side / 2))
    return top, left, side, side


def shapes_batch(
    n: int, seed: int = 0, *, size: int = 64, cue: Optional[str] = None
) -> ShapesBatch:
    """Draw ``n`` shapes images deterministically from ``seed`` (see the module doc).

    ``size``: image side in pixels (at least 32). ``cue``: ``None`` (no cue), ``"train"`` (the
    mark of the image's own class) or ``"moved"`` (the mark of a random other class). Apart from
    the mark, the same ``(n, seed, size)`` gives the same images for every ``cue``.
    """
    n, seed = check_int(n, "shapes: n"), check_int(seed, "shapes: seed")
    size = check_int(size, "shapes: size", minimum=32, what="pixels")
    if cue not in CUES:
        raise SalienceError(f"shapes: cue must be one of {CUES}, got {cue!r}.")
    u = np.empty((n, _D), dtype=np.float64)
    for i in range(n):
        u[i] = np.random.default_rng((seed, i)).random(_D)
    p = _params(u, size, cue)
    images, masks, cue_masks = [], [], []
    chunk = max(1, 2**18 // (size * size))
    for s in range(0, n, chunk):
        im, m, cm = _render({k: v[s:s + chunk] for k, v in p.items()}, size)
        images.append(im)
        masks.append(m)
        cue_masks.append(cm)
    if n == 0:
        images = [torch.zeros(0, 3, size, size)]
        masks = cue_masks = [torch.zeros(0, size, size, dtype=torch.bool)]
    return ShapesBatch(
        images=torch.cat(images),
        labels=torch.from_numpy(p["label"]).long(),
        masks=torch.cat(masks),
        scale=torch.from_numpy(2 * p["radius"] / size).float(),
        center=torch.from_numpy(np.stack([p["cx"], p["cy"]], 1) / size).float(),
        cue_masks=torch.cat(cue_masks),
        cue_labels=torch.from_numpy(p["cue_label"]).long(),
    )


def _params(u: np.ndarray, size: int, cue: Optional[str]) -> dict[str, np.ndarray]:
    """Turn the uniform draws ``u`` ``(n, _D)`` into drawing parameters (all vectorized)."""
    g = {k: u[:, s] for k, s in _SLICES.items()}
    n = u.shape[0]
    k = size / 64.0
    label = np.minimum((g["label"][:, 0] * len(CLASSES)).astype(np.int64), len(CLASSES) - 1)
    radius = (_R_MIN + (_R_MAX - _R_MIN) * g["radius"][:, 0]) * k
    angle = g["angle"][:, 0] * 2 * math.pi
    lo_x = radius + _MARGIN * k
    hi_x = size - radius - _MARGIN * k
    lo_y = radius + _BAND * k
    hi_y = size - radius - _MARGIN * k
    cx = lo_x + (hi_x - lo_x) * g["cx"][:, 0]
    cy = lo_y + (hi_y - lo_y) * g["cy"][:, 0]
    wrong = (label + 1 + np.minimum((g["wrong"][:, 0] * 4).astype(np.int64), 3)) % len(CLASSES)
    cue_label = {None: np.full(n, -1), "train": label, "moved": wrong}[cue]

    # Background: base colour, a second colour for stripes/gradient, texture amplitudes.
    bg = 0.15 + 0.7 * g["bg"]
    bg2 = 0.15 + 0.7 * g["bg2"]
    tex = g["tex"]
    # Shape colour: the first of several random colours far enough from the background colours.
    fg = g["fg"].reshape(n, _N_COLOUR_TRIES, 3)
    d1 = np.linalg.norm(fg - bg[:, None], axis=2)
    d2 = np.linalg.norm(fg - bg2[:, None], axis=2)
    ok = (d1 > 0.55) & (d2 > 0.45)
    first = np.argmax(ok, axis=1)
    chosen = fg[np.arange(n), first]
    # Fallback: black or white, whichever is farther from the background.
    lum = bg.mean(1)
    fallback = np.where(lum[:, None] > 0.5, 0.0, 1.0) * np.ones((1, 3))
    fg = np.where(ok.any(1)[:, None], chosen, fallback)
    return dict(
        label=label, radius=radius, angle=angle, cx=cx, cy=cy, cue_label=cue_label,
        bg=bg, bg2=bg2, noise=g["noise"], tex=tex, fg=fg,
        n_lines=g["n_lines"][:, 0], lines=g["lines"], n_dots=g["n_dots"][:, 0], dots=g["dots"],
    )


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres ``(H, W)`` in pixels: ``ys``, ``xs``."""
    return torch.meshgrid(
        torch.arange(size, dtype=torch.float32) + 0.5,
        torch.arange(size, dtype=torch.float32) + 0.5,
        indexing="ij",
    )


def _render(p: dict[str, np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paint one chunk: background, clutter, shape, cue. Returns images, masks, cue masks."""
    ys, xs = _grid(size)
    x, y = xs[None] / size, ys[None] / size  # (1, H, W) in [0, 1]
    img = _clutter(p, size, x, y, _background(p, size, x, y))
    # --- the shape -----------------------------------------------------------------------------
    masks = _shape_masks(p, size, xs * 1.0, ys * 1.0)
    fg = _t(p["fg"])[:, :, None, None]
    img = torch.where(masks[:, None], fg, img)
    img, cue_masks = _cue(p, size, img)
    return img.contiguous(), masks, cue_masks


def _background(p: dict[str, np.ndarray], size: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Base colour + smooth noise + stripes + linear gradient, ``(n, 3, H, W)`` in ``[0, 1]``."""
    n = p["label"].shape[0]
    # --- background: base colour + smooth noise + stripes + linear gradient -------------------
    tex = _t(p["tex"])  # (n, 6)
    bg, bg2 = _t(p["bg"])[:, :, None, None], _t(p["bg2"])[:, :, None, None]
    noise = _t(p["noise"]).reshape(n, 3, 5, 5) - 0.5
    noise = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    noise_amp = (0.1 + 0.25 * tex[:, 0])[:, None, None, None]
    theta = (tex[:, 1] * math.pi)[:, None, None]
    freq = (3 + 7 * tex[:, 2])[:, None, None]
    phase = (tex[:, 3] * 2 * math.pi)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (x * torch.cos(theta) + y * torch.sin(theta)) + phase)
    stripe_amp = (0.35 * (tex[:, 4] > 0.5).float() * tex[:, 4])[:, None, None, None]
    grad_dir = (tex[:, 5] * 2 * math.pi)[:, None, None]
    ramp = (x - 0.5) * torch.cos(grad_dir) + (y - 0.5) * torch.sin(grad_dir) + 0.5  # ~[0, 1]
    mix = (stripe_amp * stripes[:, None] + 0.4 * (1 - stripe_amp) * ramp[:, None]).clamp(0, 1)
    img = bg * (1 - mix) + bg2 * mix + noise_amp * noise
    img = img.clamp(0, 1)
    return img


def _clutter(p: dict[str, np.ndarray], size: int, x: torch.Tensor, y: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Line segments and dots painted over ``img`` (never one of the five shapes)."""
    n = p["label"].shape[0]
    k = size / 64.0
    # --- clutter: line segments and dots (never one of the five shapes) -----------------------
    lines = _t(p["lines"]).reshape(n, _N_LINES, 8)
    n_lines = torch.from_numpy((p["n_lines"] * (_N_LINES + 1)).astype(np.int64)).clamp(max=_N_LINES)
    for j in range(_N_LINES):
        L = lines[:, j]
        ax, ay, bx, by = (L[:, i][:, None, None] for i in range(4))
        width = ((0.6 + 0.8 * L[:, 4]) * k / size)[:, None, None]
        colour = L[:, 5:8][:, :, None, None]
        dx, dy = bx - ax, by - ay
        t = (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-9)).clamp(0, 1)
        dist = torch.hypot(x - ax - t * dx, y - ay - t * dy)
        on = (dist <= width) & (j < n_lines)[:, None, None]
        img = torch.where(on[:, None], colour, img)
    dots = _t(p["dots"]).reshape(n, _N_DOTS, 6)
    n_dots = torch.from_numpy((p["n_dots"] * (_N_DOTS + 1)).astype(np.int64)).clamp(max=_N_DOTS)
    for j in range(_N_DOTS):
        D = dots[:, j]
        dx_, dy_ = D[:, 0][:, None, None], D[:, 1][:, None, None]
        r = ((0.8 + 1.7 * D[:, 2]) * k / size)[:, None, None]
        colour = D[:, 3:6][:, :, None, None]
        on = (torch.hypot(x - dx_, y - dy_) <= r) & (j < n_dots)[:, None, None]
        img = torch.where(on[:, None], colour, img)
    return img


def _cue(p: dict[str, np.ndarray], size: int, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-specific checkerboard mark where ``p["cue_label"]`` asks for one; its masks."""
    n = p["label"].shape[0]
    # --- the cue -------------------------------------------------------------------------------
    cue_masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, c in enumerate(p["cue_label"].tolist()):
        if c < 0:
            continue
        top, left, h, w = cue_box(c, size)
        cue_masks[i, top:top + h, left:left + w] = True
        half = max(1, h // 2)
        check = ((torch.arange(h)[:, None] // half + torch.arange(w)[None] // half) % 2).float()
        img[i, :, top:top + h, left:left + w] = check
    return img, cue_masks


def _shape_masks(p: dict[str, np.ndarray], size: int, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Exact inside-tests of each shape on the pixel centres: bool ``(n, H, W)``."""
    n = p["label"].shape[0]
    label = torch.from_numpy(p["label"])[:, None, None]
    R = _t(p["radius"])[:, None, None]
    a = _t(p["angle"])[:, None, None]
    cx, cy = _t(p["cx"])[:, None, None], _t(p["cy"])[:, None, None]
    # Coordinates relative to the centre, rotated by -angle into the shape's own frame.
    dx, dy = xs[None] - cx, ys[None] - cy
    ca, sa = torch.cos(a), torch.sin(a)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    rho = torch.hypot(u, v)
    out = torch.zeros(n, size, size, dtype=torch.bool)

    circle = rho <= R
    half = R / math.sqrt(2)  # square inscribed in the circle of radius R
    square = (u.abs() <= half) & (v.abs() <= half)
    # Equilateral triangle with circumradius R: three half-planes at distance R/2 from the centre.
    tri = torch.ones_like(circle)
    for kk in range(3):
        phi = math.pi / 2 + kk * 2 * math.pi / 3
        tri &= (u * math.cos(phi) + v * math.sin(phi)) <= R / 2
    arm = 0.32 * R  # half-width of the cross's arms; arm tips lie on the circle of radius R
    reach = torch.sqrt(R * R - arm * arm)
    cross = ((u.abs() <= arm) & (v.abs() <= reach)) | ((v.abs() <= arm) & (u.abs() <= reach))
    # Five-pointed star: fold the angle into [0, 36 deg] from the nearest tip, then one half-plane
    # through the tip (R, 0) and the inner vertex (r_in, 36 deg).
    r_in = 0.45 * R
    step = 2 * math.pi / 5
    phi = torch.atan2(v, u) % step
    phi = torch.minimum(phi, step - phi)
    pu, pv = rho * torch.cos(phi), rho * torch.sin(phi)
    qu, qv = r_in * math.cos(step / 2), r_in * math.sin(step / 2)
    # Inside iff the point is on the origin's side of the line tip -> inner vertex.
    cross_z = (qu - R) * pv - qv * (pu - R)  # z of (q - tip) x (p - tip); origin gives qv * R > 0
    star = cross_z >= 0
    for idx, m in enumerate((circle, square, tri, cross, star)):
        out = torch.where(label == idx, m, out)
    return out
