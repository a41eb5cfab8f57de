"""``salience evaluate``: every method through the metrics, as a report a person can read.

:func:`run_evaluation` runs each saliency method of :data:`salience.METHODS`, plus two model-free
baselines (the spectral-residual map of the image alone and a random map), over a set of images
with ground-truth masks (by default held-out :mod:`salience.data` shapes), and writes to a folder:

* ``report.md`` and ``report.html``: one table, methods x metrics (pointing game, energy in the
  mask, weak-localization IoU, deletion and insertion AUC, model randomization similarity), and
  the pictures below;
* ``curves.png`` (mean deletion / insertion probability curves), ``randomization.png``
  (similarity to the original map as layers are re-initialized from the top), ``examples.png``
  (the maps of a few images);
* ``results.json``: every number, per method.

:func:`clever_hans_report` makes the "Clever Hans" section of ``salience demo``: saliency of the
cue-trained demo model sits on the cue, not on the shape, and its accuracy collapses when the
cue is moved. Files are written atomically; nothing is downloaded.
"""
from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from salience import evidence as M
from salience._core.autograd import unwrap_output
from salience._core.errors import SalienceError
from salience._core.files import atomic_write
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.progress import progress as _progress

__all__ = [
    "MetricRow",
    "BASELINES",
    "evaluate_methods",
    "run_evaluation",
    "demo_train_fn",
    "clever_hans",
    "clever_hans_report",
]

PathLike = Union[str, "Path"]
MethodLike = Union[str, Callable[..., Tensor]]

BASELINES: tuple[str, ...] = ("spectral_residual", "random")
"""Model-free rows of every table: :func:`salience.metrics.spectral_residual` and random maps."""

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class MetricRow:
    """One method's results: means over images (NaN-free images only) and the raw material.

    ``pointing``, ``energy``, ``box_iou``: localization (``None`` without masks); ``deletion``,
    ``insertion``: AUCs; ``rand_top`` / ``rand_all``: mean Spearman rank correlation of the
    absolute maps after re-initializing the top layer / all layers (cascading), and
    ``rand_ssim_top`` / ``rand_ssim_all`` the same with SSIM; ``None`` for baselines. ``curves``: mean deletion and insertion curves; ``randomization``: the full
    :class:`salience.metrics.RandomizationResult` as a dict; ``seconds``: time of the maps and
    of the randomization test; ``error``: why the method could not run, if it could not.
    """

    name: str
    pointing: Optional[float] = None
    energy: Optional[float] = None
    box_iou: Optional[float] = None
    deletion: Optional[float] = None
    insertion: Optional[float] = None
    rand_top: Optional[float] = None
    rand_all: Optional[float] = None
    rand_ssim_top: Optional[float] = None
    rand_ssim_all: Optional[float] = None
    seconds: float = 0.0
    error: Optional[str] = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    randomization: Optional[dict[str, Any]] = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMNS = (
    ("pointing", "pointing game ↑"),
    ("energy", "energy in mask ↑"),
    ("box_iou", "box IoU ↑"),
    ("deletion", "deletion AUC ↓"),
    ("insertion", "insertion AUC ↑"),
    ("rand_top", "rand. Spearman, top layer ↓"),
    ("rand_all", "rand. Spearman, all layers ↓"),
    ("rand_ssim_top", "rand. SSIM, top layer ↓"),
    ("rand_ssim_all", "rand. SSIM, all layers ↓"),
)


def _mean(t: Tensor) -> float:
    v = float(torch.nanmean(t.float()))
    return v


def _method_fn(method: MethodLike) -> tuple[str, Callable[..., Tensor]]:
    if isinstance(method, str):
        from salience.methods import METHODS

        if method not in METHODS:
            raise SalienceError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        return method, METHODS[method]
    if callable(method):
        return getattr(method, "__name__", "method"), method
    raise SalienceError(f"expected a method name or function, got {type(method).__name__}")


def _maps(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Tensor, batch: int) -> Tensor:
    """``fn``'s ``(B, H, W)`` maps of ``x`` in chunks of ``batch``; 4-D maps reduced by max |.|."""
    out = []
    for i in range(0, x.shape[0], batch):
        m = fn(model, x[i:i + batch], target[i:i + batch]).detach()
        if m.dim() == 4:
            m = m.abs().amax(1)
        if m.shape[-2:] != x.shape[-2:]:
            m = torch.nn.functional.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear",
                                                align_corners=False)[:, 0]
        out.append(m.float())
    return torch.cat(out)


def evaluate_methods(
    model: nn.Module,
    x: Tensor,
    masks: Optional[Tensor] = None,
    *,
    methods: Optional[Sequence[MethodLike]] = None,
    baselines: bool = True,
    steps: int = 24,
    randomization_images: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[MetricRow], dict[str, Tensor]]:
    """Every method (default: all of :data:`salience.METHODS`) and the baselines through the
    metrics on ``x`` ``(B, C, H, W)`` with optional ``masks`` ``(B, H, W)``.

    The target is the class the model predicts on each image. Returns one :class:`MetricRow`
    per method and the maps ``{name: (B, H, W)}``. A method that fails (e.g. Grad-CAM on a model
    without convolutions) gets a row with its ``error`` and the others go on.
    """
    from salience.methods import METHODS

    items = [_method_fn(m) for m in (methods if methods is not None else list(METHODS))]
    names = [n for n, _ in items] + (list(BASELINES) if baselines else [])
    with model_guard(model), torch.no_grad():
        out = torch.cat([unwrap_output(model(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)])
    target = out.reshape(out.shape[0], -1).argmax(1)
    rows: list[MetricRow] = []
    all_maps: dict[str, Tensor] = {}
    xr = x[:randomization_images]
    with _progress(len(names), "evaluate", enabled=progress) as bar:
        for name in names:
            row = MetricRow(name)
            t0 = time.perf_counter()
            try:
                if name == "spectral_residual" and baselines and name not in dict(items):
                    maps = M.spectral_residual(x)
                elif name == "random" and baselines and name not in dict(items):
                    maps = M.random_maps((x.shape[0], *x.shape[-2:]), seed=seed, device=x.device)
                else:
                    maps = _maps(dict(items)[name], model, x, target, batch_size)
                    r = M.randomization(model, xr, dict(items)[name], target[:randomization_images], seed=seed)
                    row.randomization = r.as_dict()
                    row.rand_top = r["spearman_abs"][0]
                    row.rand_all = r["spearman_abs"][-1]
                    row.rand_ssim_top = r["ssim"][0]
                    row.rand_ssim_all = r["ssim"][-1]
            except Exception as e:  # noqa: BLE001 - one method's failure must not end the evaluation
                row.error = f"{type(e).__name__}: {e}"
                rows.append(row)
                bar.update(1)
                continue
            row.seconds = time.perf_counter() - t0
            all_maps[name] = maps
            if masks is not None:
                row.pointing = _mean(M.pointing_game(maps, masks))
                row.energy = _mean(M.energy_in_mask(maps, masks))
                row.box_iou = _mean(M.weak_localization(maps, masks))
            dc = M.deletion_curves(model, x, maps, target, steps=steps, batch_size=max(batch_size, 64), seed=seed)
            ic = M.insertion_curves(model, x, maps, target, steps=steps, batch_size=max(batch_size, 64), seed=seed)
            row.deletion, row.insertion = _mean(M.auc(dc)), _mean(M.auc(ic))
            row.curves = {"deletion": dc.mean(0).tolist(), "insertion": ic.mean(0).tolist()}
            rows.append(row)
            bar.update(1)
    return rows, all_maps


# ----------------------------------------------------------------------------- tables


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.3f}"


def _table(rows: Sequence[MetricRow]) -> tuple[list[str], list[list[str]]]:
    cols = [(k, t) for k, t in _COLUMNS if any(getattr(r, k) is not None for r in rows)]
    header = ["method"] + [t for _, t in cols] + ["time (s)"]
    body = []
    for r in rows:
        if r.error:
            body.append([r.name] + [f"failed: {r.error}"] + [""] * len(cols))
            continue
        body.append([r.name] + [_fmt(getattr(r, k)) for k, _ in cols] + [f"{r.seconds:.2f}"])
    return header, body


def markdown_table(rows: Sequence[MetricRow]) -> str:
    """The results as a GitHub-flavoured markdown table."""
    header, body = _table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots (PIL only)

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]``: a step of 1, 2, 2.5 or 5 times a power of ten
    giving about ``target`` intervals, e.g. ``(-0.2, 1.0) -> [-0.2, 0, 0.2, ..., 1.0]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(round(k * step, 10) + 0.0)
        k += 1
    return ticks


def line_plot(series: Mapping[str, Sequence[float]], *, title: str = "", xlabel: str = "",
              ylabel: str = "", xticks: Optional[Sequence[str]] = None, ylim: tuple[float, float] = (0.0, 1.0),
              size: tuple[int, int] = (520, 340)) -> np.ndarray:
    """A plain line plot as uint8 ``(H, W, 3)``, drawn with pillow (no matplotlib needed).

    Each series is plotted against evenly spaced x positions in ``[0, 1]``, or against
    ``xticks`` (one label per point) when given.
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    names = list(series)
    left, right, top = 48, 170, 26
    bottom = 62 if xticks else 42
    pw, ph = w - left - right, h - top - bottom
    lo, hi = ylim
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for v in nice_ticks(lo, hi):
        y = top + ph - ph * (v - lo) / (hi - lo)
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.line([left + 1, y, left + pw - 1, y], fill=(235, 235, 235))
        d.text((4, y - 6), f"{v:g}", fill=(0, 0, 0), font=font)
    n_pts = max((len(v) for v in series.values()), default=2)
    if xticks:
        for i, t in enumerate(xticks):
            x = left + pw * i / max(1, len(xticks) - 1)
            d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
            d.text((x - 3 * len(str(t)), top + ph + 6 + 12 * (i % 2)), str(t), fill=(0, 0, 0), font=font)
    else:
        for k in range(5):
            x = left + pw * k / 4
            d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
            d.text((x - 8, top + ph + 6), f"{k / 4:.2f}", fill=(0, 0, 0), font=font)
    d.text((left, 6), title, fill=(0, 0, 0), font=font)
    d.text((left + pw // 2 - 3 * len(xlabel), h - 16), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, top - 14), ylabel, fill=(80, 80, 80), font=font)
    for j, name in enumerate(names):
        ys = [float(v) for v in series[name]]
        colour = _PALETTE[j % len(_PALETTE)]
        pts = []
        for i, v in enumerate(ys):
            if math.isnan(v):
                continue
            x = left + pw * i / max(1, len(ys) - 1)
            y = top + ph - ph * (min(max(v, lo), hi) - lo) / (hi - lo)
            pts.append((x, y))
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(ys) <= 12 else ():
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 14 * j
        d.line([left + pw + 10, ly + 6, left + pw + 28, ly + 6], fill=colour, width=3)
        d.text((left + pw + 32, ly), name[:22], fill=(0, 0, 0), font=font)
    del n_pts
    return np.asarray(img).copy()


def _save_png(path: Path, arr: np.ndarray) -> Path:
    from salience.render import viz

    return viz.save_png(path, arr)


# ----------------------------------------------------------------------------- inputs


def _demo_inputs(model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, str]:
    from salience.demo import data
    from salience.loading import normalize_input

    info = model_info(model)
    size = 64
    if info.input_size is not None and info.input_size[0] == info.input_size[1] and info.input_size[0] >= 32:
        size = int(info.input_size[0])
    b = data.shapes_batch(n, seed, size=size)
    x = normalize_input(b.images, info)
    return x, b.images, b.masks, f"{n} held-out shapes images (salience.data, seed {seed}, {size}x{size})"


def _names(paths: Sequence[Path], k: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:k])
    return shown + (f" and {len(paths) - k} more" if len(paths) > k else "")


def _folder_inputs(model: nn.Module, images: PathLike, masks: Optional[PathLike], n: int
                   ) -> tuple[Tensor, Tensor, Optional[Tensor], str]:
    """The first ``n`` image files of ``images`` (sorted by name) as the model's input
    ``(N, C, h, w)``, the same images in ``[0, 1]`` for pictures ``(N, 3, h, w)``, their masks
    ``(N, h, w)`` bool (``None`` without ``masks``) and a one-line description.

    A mask is the file in ``masks`` with the image's stem (``cat.jpg`` <-> ``cat.png``), resized
    and cropped like the image, and set where its brightest channel is at least half the mask's
    maximum (so white-on-black, 0/1 label images and coloured label images all work). Any image without a mask, or any unreadable file, is an error:
    an evaluation that silently drops images is not the evaluation the user asked for.
    """
    from salience.loading import load_image, load_images, resize_crop

    info = model_info(model)
    folder = Path(images)
    if not folder.is_dir():
        raise SalienceError(f"--images: {folder} is not a folder; give a folder of image files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)[:n]
    if not files:
        raise SalienceError(f"--images: no image files ({', '.join(_IMAGE_SUFFIXES)}) in {folder}")
    mask_files: dict[str, Path] = {}
    if masks is not None:
        mfolder = Path(masks)
        if not mfolder.is_dir():
            raise SalienceError(f"--masks: {mfolder} is not a folder; give a folder of mask images")
        for p in sorted(mfolder.iterdir()):
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES:
                if p.stem in mask_files:
                    raise SalienceError(f"--masks: two masks for the image {p.stem!r} in {mfolder}: "
                                        f"{mask_files[p.stem].name} and {p.name}; keep one")
                mask_files[p.stem] = p
        missing = [p for p in files if p.stem not in mask_files]
        if missing:
            raise SalienceError(
                f"{len(missing)} of {len(files)} images in {folder} have no mask of the same name in {mfolder} "
                f"({_names(missing)}); the mask of cat.jpg is e.g. cat.png"
            )
    x, ok, errors = load_images(files, info)
    if errors:
        raise SalienceError(f"{len(errors)} of {len(files)} images could not be read; the first: {errors[0][1]}")
    assert x is not None
    size = tuple(x.shape[-2:])

    def fit(t: Tensor, mode: str) -> Tensor:  # (C, H, W) at the model's input size
        t = resize_crop(t, info)
        if tuple(t.shape[-2:]) != size:
            kw = {"align_corners": False} if mode == "bilinear" else {}
            t = torch.nn.functional.interpolate(t[None], size=size, mode=mode, **kw)[0]
        return t

    raw = torch.stack([fit(load_image(p), "bilinear") for p in ok])
    m = None
    if masks is not None:
        ms = []
        for p in ok:
            mk = fit(load_image(mask_files[Path(p).stem]).amax(0, keepdim=True), "nearest")[0]
            top = float(mk.max())
            ms.append(mk >= 0.5 * top if top > 0 else torch.zeros_like(mk, dtype=torch.bool))
        m = torch.stack(ms)
    return x, raw, m, f"{len(ok)} images from {folder}" + (f" with masks from {masks}" if masks else "")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- the report


def run_evaluation(
    model: nn.Module,
    out_dir: PathLike,
    *,
    images: Optional[PathLike] = None,
    masks: Optional[PathLike] = None,
    methods: Optional[Sequence[MethodLike]] = None,
    progress: bool = True,
    n: int = 64,
    seed: int = 10_000,
    steps: int = 24,
    randomization_images: int = 8,
    train_fn: Optional[Callable[[Tensor, Tensor], nn.Module]] = None,
    train_images: int = 1000,
) -> Path:
    """Evaluate every method on ``model`` and write the report to ``out_dir``; returns the path
    of ``report.html`` (``report.md`` and ``results.json`` lie beside it).

    ``images``/``masks``: folders of image files and of masks with the same file names (stems);
    without them, ``n`` held-out shapes images with exact masks (seed ``seed``). ``methods``:
    names or functions (default all of :data:`salience.METHODS`). ``train_fn(images, labels) ->
    model``: if given, also the data randomization test on ``train_images`` shapes (slow: it
    trains two models; see :func:`demo_train_fn`).
    """
    from salience.render.report import Report

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SalienceError(f"n must be an int >= 1, got {n!r}")
    if masks is not None and images is None:
        raise SalienceError("masks need their images: give images=DIR too")
    if methods is not None:
        methods = list(methods)
        for mm in methods:
            _method_fn(mm)  # unknown names fail here, before any work
    start = time.perf_counter()
    if images is None:
        x, raw, m, source = _demo_inputs(model, n, seed)
    else:
        x, raw, m, source = _folder_inputs(model, images, masks, n)
    out = Path(out_dir)  # created only once the inputs are known to be good
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SalienceError(f"cannot create the output folder {out} ({e.strerror or e})") from None
    device = _device_of(model)
    x, m = x.to(device), (m.to(device) if m is not None else None)
    rows, maps = evaluate_methods(model, x, m, methods=methods, steps=steps,
                                  randomization_images=randomization_images, progress=progress)
    ok = [r for r in rows if not r.error]

    # Plots.
    curves = out / "curves.png"
    dc = line_plot({r.name: r.curves["deletion"] for r in ok}, title="deletion: probability of the class",
                   xlabel="fraction of pixels removed (most salient first)")
    ic = line_plot({r.name: r.curves["insertion"] for r in ok}, title="insertion: probability of the class",
                   xlabel="fraction of pixels inserted (most salient first)")
    _save_png(curves, np.concatenate([dc, ic], axis=1))
    rand_rows = [r for r in ok if r.randomization]
    rand_png = None
    if rand_rows:
        layers = ["original"] + list(rand_rows[0].randomization["layers"])  # type: ignore[index]
        plots = []
        for kind, label in (("spearman_abs", "Spearman |map|"), ("ssim", "SSIM")):
            plots.append(line_plot(
                {r.name: [1.0] + list(r.randomization[kind]) for r in rand_rows},  # type: ignore[index]
                title=f"cascading randomization: {label} to the original map", xlabel="re-initialized down to",
                xticks=layers, ylim=(-0.2, 1.0)))
        rand_png = _save_png(out / "randomization.png", np.concatenate(plots, axis=1))
    examples = None
    if maps:
        from salience.render import viz

        k = min(4, x.shape[0])
        examples = _save_png(out / "examples.png", viz.figure(raw[:k], {nm: mp[:k] for nm, mp in maps.items()},
                                                              overlay=False, scale_to=96))

    data_rand = None
    if train_fn is not None:
        data_rand = _data_randomization_rows(train_fn, model, methods, train_images, x[:randomization_images])

    md = _markdown_report(rows, source, model, data_rand, time.perf_counter() - start, m is not None)
    atomic_write(out / "report.md", md.encode("utf-8"))
    results = {
        "source": source,
        "model": model_info(model).name,
        "rows": [r.as_dict() for r in rows],
        "data_randomization": data_rand,
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=float).encode("utf-8"))

    rep = Report("salience evaluate", f"model {model_info(model).name}; {source}")
    rep.heading("Methods and metrics")
    header, body = _table(rows)
    rep.table(header, body)
    rep.paragraph(_LEGEND, css="note")
    if data_rand:
        rep.heading("Data randomization")
        rep.table(["method", "Spearman |map|", "Spearman", "SSIM", "HOG"],
                  [[k] + [_fmt(v[s]) for s in M.SIMILARITIES] for k, v in data_rand["values"].items()])
        rep.paragraph(f"train accuracy, true labels {data_rand['train_accuracy']['true']:.3f}; shuffled labels "
                      f"{data_rand['train_accuracy']['shuffled']:.3f}", css="note")
    rep.heading("Deletion and insertion curves")
    rep.figure(curves, "mean probability of the predicted class; left deletion (lower is better), right "
               "insertion (higher is better)")
    if rand_png is not None:
        rep.heading("Model randomization (cascading, top layer first)")
        rep.figure(rand_png, "similarity of the map of the randomized model to the original map; a method that "
                   "explains the model should fall quickly")
    if examples is not None:
        rep.heading("Examples")
        rep.figure(examples, "the maps of the first images")
    rep.paragraph(f"Made in {time.perf_counter() - start:.1f} s.", css="note")
    return rep.write(out / "report.html")


_LEGEND = (
    "pointing game: share of images whose map maximum is on the object; energy in mask: share of the map's "
    "mass on the object; box IoU: box of the map thresholded at 20% of its maximum vs the object's box; "
    "deletion / insertion AUC: area under the probability of the predicted class as pixels are removed "
    "(zero) / put back on a blurred image in the map's order; rand. Spearman / SSIM: Spearman rank "
    "correlation / structural similarity of |map| with the map after re-initializing the top layer / all "
    "layers, top down (Adebayo et al.; low means the map depends on the weights; a map of the image "
    "alone would score 1). Baselines: spectral residual (the image alone) and a random map."
)


def _markdown_report(rows: Sequence[MetricRow], source: str, model: nn.Module, data_rand: Optional[dict],
                     seconds: float, with_masks: bool) -> str:
    parts = [f"# salience evaluate: {model_info(model).name}", "", f"{source}.", "", markdown_table(rows), "",
             _LEGEND, ""]
    if data_rand:
        parts += ["## Data randomization", "", "| method | Spearman abs | Spearman | SSIM | HOG |", "|---|---|---|---|---|"]
        parts += [f"| {k} | " + " | ".join(_fmt(v[s]) for s in M.SIMILARITIES) + " |"
                  for k, v in data_rand["values"].items()]
        parts += ["", f"train accuracy: true labels {data_rand['train_accuracy']['true']:.3f}, shuffled "
                  f"{data_rand['train_accuracy']['shuffled']:.3f}", ""]
    parts += ["![deletion and insertion curves](curves.png)", "", "![randomization](randomization.png)", "",
              f"Made in {seconds:.1f} s.", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- data randomization


def demo_train_fn(epochs: int = 4, seed: int = 0, lr: float = 4e-3, batch: int = 64
                  ) -> Callable[[Tensor, Tensor], nn.Module]:
    """A ``train_fn(images, labels) -> model`` for the data randomization test: a fresh
    :class:`salience.zoo.ShapesNet` trained for ``epochs`` with AdamW (seeded, scoped RNG)."""
    from salience.demo.zoo import ShapesNet

    def train(images: Tensor, labels: Tensor) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = ShapesNet(num_outputs=int(labels.max()) + 1, widths=(16, 32, 48, 64)).to(images.device)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(images.shape[0], device=images.device)
                for i in range(0, images.shape[0], batch):
                    idx = order[i:i + batch]
                    loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            model.eval()
        return model

    return train


def _data_randomization_rows(train_fn: Callable[[Tensor, Tensor], nn.Module], model: nn.Module,
                             methods: Optional[Sequence[MethodLike]], n_train: int, x: Tensor) -> dict:
    from salience.demo import data
    from salience.methods import METHODS

    b = data.shapes_batch(n_train, 0)
    images, labels = b.images.to(x.device), b.labels.to(x.device)
    trained: dict[str, nn.Module] = {}

    def cached(imgs: Tensor, y: Tensor) -> nn.Module:  # train once per label set, reuse for every method
        key = "true" if torch.equal(y, labels) else "shuffled"
        if key not in trained:
            trained[key] = train_fn(imgs, y)
        return trained[key]

    values: dict[str, dict[str, float]] = {}
    acc: dict[str, float] = {}
    for name, fn in [_method_fn(mm) for mm in (methods if methods is not None else list(METHODS))]:
        try:
            r = M.data_randomization(cached, images, labels, x, fn)
        except Exception:  # noqa: BLE001
            continue
        values[name] = r["values"]  # type: ignore[assignment]
        acc = r["train_accuracy"]  # type: ignore[assignment]
    return {"values": values, "train_accuracy": acc, "n_train": n_train}


# ----------------------------------------------------------------------------- Clever Hans


def clever_hans(n: int = 200, n_maps: int = 32, seed: int = 10_000,
                methods: Sequence[str] = ("vanilla", "guided_backprop", "gradcam")) -> dict[str, Any]:
    """The numbers of the Clever Hans demo: accuracy of ``demo:shapes-cue`` (and of the clean
    ``demo:shapes``) with the cue as in training, moved to a wrong class's slot, and absent; and,
    per method, the mean share of saliency on the cue mark and on the shape (images with the
    training cue), with the model-free spectral-residual map as the baseline (model ``"none"``).

    Returns ``{"accuracy": {model: {"train" | "moved" | "none": acc}}, "energy": {model:
    {method: {"cue", "shape", "cue_area", "shape_area"}}}, "maps": {"model: method": (n_maps, H,
    W)}, "images": (n_maps, 3, H, W), "labels": (n_maps,)}``."""
    from salience.demo import data, zoo
    from salience.methods import METHODS

    cue_model = zoo.load_demo("shapes-cue")
    clean = zoo.load_demo("shapes")
    acc: dict[str, dict[str, float]] = {}
    for mname, mdl in (("shapes-cue", cue_model), ("shapes", clean)):
        acc[mname] = {}
        for cue in ("train", "moved", None):
            b = data.shapes_batch(n, seed, cue=cue)
            with model_guard(mdl), torch.no_grad():
                pred = torch.cat([mdl(b.images[i:i + 100]).argmax(1) for i in range(0, n, 100)])
            acc[mname][cue or "none"] = float((pred == b.labels).float().mean())
    b = data.shapes_batch(n_maps, seed, cue="train")
    energy: dict[str, dict[str, dict[str, float]]] = {}
    maps: dict[str, Tensor] = {}
    for mname, mdl in (("shapes-cue", cue_model), ("shapes", clean)):
        energy[mname] = {}
        for meth in methods:
            if meth not in METHODS:
                continue
            mp = METHODS[meth](mdl, b.images).detach()
            if mp.dim() == 4:
                mp = mp.abs().amax(1)
            energy[mname][meth] = {
                "cue": _mean(M.energy_in_mask(mp, b.cue_masks)),
                "shape": _mean(M.energy_in_mask(mp, b.masks)),
                "cue_area": float(b.cue_masks.float().mean()),
                "shape_area": float(b.masks.float().mean()),
            }
            maps[f"{mname}: {meth}"] = mp
    # The model-free baseline: what the image alone makes salient (the cue is a small, sharp,
    # high-contrast pattern, so a model-free map may also like it; the models are compared to it).
    sr = M.spectral_residual(b.images)
    energy["none"] = {"spectral_residual": {
        "cue": _mean(M.energy_in_mask(sr, b.cue_masks)),
        "shape": _mean(M.energy_in_mask(sr, b.masks)),
        "cue_area": float(b.cue_masks.float().mean()),
        "shape_area": float(b.masks.float().mean()),
    }}
    return {"accuracy": acc, "energy": energy, "maps": maps, "images": b.images, "labels": b.labels}


def clever_hans_report(out_dir: PathLike, *, n: int = 200, n_maps: int = 16) -> str:
    """The Clever Hans section of the demo report: an HTML fragment; writes ``clever_hans.png``
    into ``out_dir`` (the fragment links it by that relative name). ``n``: images per accuracy,
    ``n_maps``: images whose saliency is measured (see :func:`clever_hans`)."""
    from salience.render import viz

    out = Path(out_dir)
    r = clever_hans(n=n, n_maps=n_maps)
    k = 4
    pic = viz.figure(r["images"][:k], {name: m[:k] for name, m in r["maps"].items()
                                       if name.endswith(("vanilla", "gradcam"))}, overlay=True, scale_to=96)
    viz.save_png(out / "clever_hans.png", pic)
    acc = r["accuracy"]
    esc = html.escape
    rows_acc = "".join(
        f"<tr><td>demo:{esc(mn)}</td><td>{a['train']:.3f}</td><td>{a['moved']:.3f}</td><td>{a['none']:.3f}</td></tr>"
        for mn, a in acc.items()
    )
    def dens(e: dict, part: str) -> float:
        return e[part] / max(e[f"{part}_area"], 1e-12)

    rows_e = "".join(
        f"<tr><td>{'none (the image alone)' if mn == 'none' else 'demo:' + esc(mn)}</td><td>{esc(meth)}</td>"
        f"<td>{e['cue']:.3f}</td><td>{e['shape']:.3f}</td>"
        f"<td>{dens(e, 'cue'):.1f}</td><td>{dens(e, 'shape'):.1f}</td></tr>"
        for mn, per in r["energy"].items() for meth, e in per.items()
    )
    cue_e = r["energy"].get("shapes-cue", {})
    clean_e = r["energy"].get("shapes", {})
    lines = []
    for meth, e in cue_e.items():
        c = clean_e.get(meth)
        lines.append(
            f"{esc(meth)}: {dens(e, 'cue'):.1f}x on the cue vs {dens(e, 'shape'):.1f}x on the shape"
            + (f" (clean model: {dens(c, 'cue'):.1f}x vs {dens(c, 'shape'):.1f}x)" if c else "")
        )
    sr_e = r["energy"].get("none", {}).get("spectral_residual")
    if sr_e:
        lines.append(f"the image alone (spectral residual, no model): {dens(sr_e, 'cue'):.1f}x vs "
                     f"{dens(sr_e, 'shape'):.1f}x")
    any_e = next(iter(cue_e.values()), None)
    areas = (f" The cue covers {any_e['cue_area']:.1%} of the image and the shape {any_e['shape_area']:.1%}, so "
             "we also give each share divided by its area (1 = no preference; higher = more saliency per "
             "pixel than the image average): " + "; ".join(lines) + "." if any_e else "")
    return (
        "<p>demo:shapes-cue was trained on shapes whose class is also written as a small checkerboard mark in "
        "a class-specific slot along the top border (the 'tree with leaves' behind every 'bird'). Is it "
        "looking at the shape or at the mark? On images with the training cue, its saliency concentrates on "
        "the mark, while the clean model demo:shapes looks at the shape." + areas +
        "</p>"
        "<table><tr><th>model</th><th>method</th><th>energy on the cue</th><th>energy on the shape</th>"
        "<th>cue: energy / area</th><th>shape: energy / area</th></tr>" + rows_e + "</table>"
        "<p>The test that saliency predicted: move the mark to a wrong class's slot, or remove it.</p>"
        "<table><tr><th>model</th><th>accuracy, cue as in training</th><th>cue moved</th><th>no cue</th></tr>"
        + rows_acc + "</table>"
        '<figure><img src="clever_hans.png" alt="Clever Hans saliency"><figcaption>Images with the training '
        "cue; maps of the cue model and of the clean model (vanilla gradients, Grad-CAM).</figcaption></figure>"
    )
