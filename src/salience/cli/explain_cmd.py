"""``salience explain``: saliency maps of image files, as figures (PNG), raw maps (.npy) and a summary."""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from salience import targets as _targets
from salience._core.errors import SalienceError
from salience._core.files import atomic_write
from salience._core.info import ModelInfo, model_info
from salience._core.progress import Progress, progress
from salience._core.tensors import check_int, model_device
from salience.cli.common import (EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, add_model_args, error, figure,
                                 load_model_arg, output_folder, parse_class, parse_methods, probabilities,
                                 safe_name, scores, to_image, warn)
from salience.loading import DEFAULT_MAX_PIXELS, load_images, unnormalize
from salience.methods import METHODS
from salience.render import viz
from salience.rules import UNSUPPORTED

Maps = dict[str, list[Tensor]]
"""Per method name: a tensor ``(N, ...)`` of every image's map for each of the R targets."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("explain", help="explain image files: figures (PNG) and raw maps (.npy)",
                       description="Explain image files with one or more saliency methods.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    add_model_args(p)
    p.add_argument("--method", action="append", metavar="NAME",
                   help="saliency method (repeat or comma-separate for several; default vanilla; see 'salience list')")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target", metavar="CLASS", help="class index or name to explain (default: predicted)")
    g.add_argument("--top", type=int, metavar="K", help="explain each of the K top classes")
    p.add_argument("--mode", choices=_targets.REGRESSION_MODES, default="increase",
                   help="regression models: what the map shows (default increase)")
    p.add_argument("--out", "-o", default="salience-out", metavar="DIR", help="output folder (default salience-out)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images over N pixels before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per forward/backward pass")
    p.add_argument("--unsupported", choices=UNSUPPORTED, default="error",
                   help="guided backprop / deconvnet on activations the rule is not defined for (GELU, SiLU, ...): "
                        "refuse (default), or pass their plain gradient with a warning or silently")
    pg = p.add_mutually_exclusive_group()
    pg.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    pg.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Explain ``args.images``: figures, maps and ``summary.json`` in ``args.out``; prints a line per image."""
    methods = _check_args(args)
    model = load_model_arg(args)
    info = model_info(model)
    if info.task == "regression" and args.top is not None:
        raise SalienceError(f"--top ranks classes, but {info.name} is a regression model; use --target OUTPUT --mode")
    batch, ok_paths, errors = _load_images(args, info, model)
    if batch is None:
        error(f"none of the {len(args.images)} image(s) could be read; nothing explained")
        return EXIT_PARTIAL
    out = scores(model, batch, args.batch_size)
    chosen = _choose_targets(args, info, out)
    maps, failed = _compute_maps(args, model, batch, chosen, methods)
    if not maps:
        error("every method failed; nothing written")
        return EXIT_USAGE
    out_dir = output_folder(args.out)
    n_maps = _write_results(args, info, out_dir, batch, out, chosen, maps, ok_paths, errors)
    print(f"wrote {len(ok_paths)} figure(s) and {n_maps} map(s) to {out_dir}/"
          + (f"; {len(errors)} image(s) skipped" if errors else ""))
    return EXIT_PARTIAL if errors or failed else EXIT_OK


def _check_args(args: argparse.Namespace) -> list[str]:
    """The method names; the integer options checked (before any model is loaded)."""
    methods = parse_methods(args.method)
    if args.top is not None:
        check_int(args.top, "--top", minimum=1)
    check_int(args.batch_size, "--batch-size", minimum=1)
    return methods


def _load_images(args: argparse.Namespace, info: ModelInfo,
                 model: nn.Module) -> tuple[Optional[Tensor], list[str], list[tuple[str, str]]]:
    """The readable images as one batch on the model's device (``None`` if none is), their paths, and
    ``(path, message)`` of the others (each warned about)."""
    batch, ok_paths, errors = load_images(args.images, info, max_pixels=args.max_pixels)
    for _, msg in errors:
        warn(f"skipped {msg}")
    return (batch.to(model_device(model)) if batch is not None else None), ok_paths, errors


# --------------------------------------------------------------------------------- targets


@dataclass
class Chosen:
    """What to explain: R targets per image.

    ``classes``: ``(N, R)`` the class (regression: the output) of each image's targets; ``ranks``: a
    label per target, for file names (``top1``.., ``target``, or ``OUTPUT-mode``); ``regression``:
    whether the model is a regression model (one target, ``--mode`` of the output ``--target``).
    """

    classes: Tensor
    ranks: list[str]
    regression: bool = False
    mode: str = "increase"

    def for_chunk(self, start: int, xb: Tensor) -> Any:
        """The target argument of a method for the images ``start:start + len(xb)``: ``(b,)`` classes
        for one rank, ``(b, R)`` for several (one call, one forward pass for all R)."""
        if self.regression:
            return _targets.regression(int(self.classes[0, 0]), self.mode)
        part = self.classes[start:start + xb.shape[0]]
        return (part[:, 0] if len(self.ranks) == 1 else part).to(xb.device)

    def row_labels(self, i: int, info: ModelInfo) -> list[str]:
        """Image ``i``'s figure row labels, one per target."""
        if self.regression:
            return [info.class_name(int(self.classes[i, 0])) + f" {self.mode}"]
        return [f"{label}: {info.class_name(int(self.classes[i, j]))}" for j, label in enumerate(self.ranks)]

    def tag(self, i: int, j: int) -> str:
        """Image ``i``'s target ``j`` in a map's file name."""
        return self.ranks[j] if self.regression else f"{self.ranks[j]}-class{int(self.classes[i, j])}"


def _choose_targets(args: argparse.Namespace, info: ModelInfo, out: Tensor) -> Chosen:
    """The targets that ``--target``, ``--top`` and ``--mode`` ask for, given the model's outputs ``(N, K)``."""
    n, k = out.shape
    if info.task == "regression":
        idx = parse_class(args.target, info, k) if args.target is not None else 0
        return Chosen(torch.full((n, 1), idx, dtype=torch.long), [f"{safe_name(info.class_name(idx))}-{args.mode}"],
                      regression=True, mode=args.mode)
    if args.target is not None:
        idx = parse_class(args.target, info, k)
        return Chosen(torch.full((n, 1), idx, dtype=torch.long), ["target"])
    if args.top and args.top > k:
        raise SalienceError(f"--top {args.top} is more than the model's {k} classes; use --top {k} or less")
    classes = out.topk(min(args.top or 1, k), dim=1).indices.cpu()
    return Chosen(classes, [f"top{j + 1}" for j in range(classes.shape[1])])


# --------------------------------------------------------------------------------- maps


def _with_options(fn: Callable[..., Tensor], **options: Any) -> Callable[..., Tensor]:
    """``fn`` with those of ``options`` that it takes as keywords (the others are for other methods)."""
    # Named parameters only (not _engine.accepts, which also says yes to **options: smoothgrad
    # would hand unsupported= on to vanilla, which has no such option).
    params = inspect.signature(fn).parameters
    taken = {k: v for k, v in options.items() if k in params}
    return functools.partial(fn, **taken) if taken else fn


def _compute_maps(args: argparse.Namespace, model: nn.Module, batch: Tensor, chosen: Chosen,
                  methods: Sequence[str]) -> tuple[Maps, list[str]]:
    """Every method's maps (the methods that failed left out, warned about, and named in the list),
    with a progress bar on long work."""
    chunks = list(range(0, batch.shape[0], args.batch_size))
    total = len(methods) * len(chunks)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    maps: Maps = {}
    failed: list[str] = []
    with progress(total, "explain", enabled=show and total > 1) as bar:
        for name in methods:
            fn = _with_options(METHODS[name], unsupported=args.unsupported)
            try:
                every = torch.cat([_chunk_maps(fn, model, batch[s:s + args.batch_size], s, chosen, bar)
                                   for s in chunks])
            except SalienceError as e:
                hint = (" (--unsupported warn passes their plain gradient instead)"
                        if "unsupported" in str(e) and args.unsupported == "error" else "")
                warn(f"method {name} failed: {e}{hint}")
                failed.append(name)
                continue
            maps[name] = [every[:, j] for j in range(len(chosen.ranks))]
    return maps, failed


def _chunk_maps(fn: Callable[..., Tensor], model: nn.Module, xb: Tensor, start: int, chosen: Chosen,
                bar: Progress) -> Tensor:
    """One method's maps ``(b, R, ...)`` of the images ``xb`` (from ``start``): all R targets in one call."""
    part = fn(model, xb, chosen.for_chunk(start, xb)).detach().cpu()
    bar.update(1)
    return part if len(chosen.ranks) > 1 else part.unsqueeze(1)


# --------------------------------------------------------------------------------- files


def _write_results(args: argparse.Namespace, info: ModelInfo, out_dir: Path, batch: Tensor, out: Tensor,
                   chosen: Chosen, maps: Maps, ok_paths: Sequence[str], errors: Sequence[tuple[str, str]]) -> int:
    """Each image's figure and maps, its printed line, then ``summary.json``; returns the number of maps."""
    probs = probabilities(out) if not chosen.regression else out
    summary = []
    n_maps = 0
    for i, (path, stem) in enumerate(zip(ok_paths, _unique_stems(ok_paths))):
        picture = to_image(unnormalize(batch[i].cpu(), info))
        files = {"figure": str(_write_figure(out_dir / f"{stem}.png", picture, i, maps, chosen, info)),
                 "maps": _write_maps(out_dir, stem, i, maps, chosen)}
        n_maps += len(files["maps"])
        if chosen.regression:
            line, entry = _regression_result(path, out[i], info)
        else:
            line, entry = _class_result(path, probs[i], chosen.classes[i], info, args.top)
        print(line)
        summary.append({**entry, **files})
    _write_summary(out_dir, info, maps, summary, errors)
    return n_maps


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """The file name stems of ``paths`` as safe names, ``-2``, ``-3``.. added to repeats."""
    stems: list[str] = []
    seen: dict[str, int] = {}
    for p in paths:
        stem = safe_name(Path(p).stem)
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}-{n + 1}")
    return stems


def display_map(m: Tensor) -> Tensor:
    """A map for a picture: ``(H, W)``; a per-channel map ``(C, H, W)`` becomes ``max_c |m|``."""
    return m.abs().amax(0) if m.dim() == 3 else m


def _write_figure(path: Path, picture: Tensor, i: int, maps: Maps, chosen: Chosen, info: ModelInfo) -> Path:
    """Image ``i``'s figure: a row per target; columns: the image, then each method's map and overlay."""
    r = len(chosen.ranks)
    rows = picture.unsqueeze(0).repeat(r, 1, 1, 1)
    fig_maps = {name: torch.stack([display_map(ms[j][i]) for j in range(r)]) for name, ms in maps.items()}
    viz.save_png(path, figure(rows, fig_maps, chosen.row_labels(i, info)))
    return path


def _write_maps(out_dir: Path, stem: str, i: int, maps: Maps, chosen: Chosen) -> list[str]:
    """Image ``i``'s raw maps, a ``.npy`` per method and target; returns their paths."""
    written = []
    for name, ms in maps.items():
        for j in range(len(chosen.ranks)):
            npy = out_dir / f"{stem}_{safe_name(name)}_{chosen.tag(i, j)}.npy"
            viz.save_npy(npy, ms[j][i].numpy())
            written.append(str(npy))
    return written


def _regression_result(path: str, out: Tensor, info: ModelInfo) -> tuple[str, dict[str, Any]]:
    """A regression image's printed line (every output's value) and its summary entry."""
    values = {info.class_name(j): float(out[j]) for j in range(out.shape[0])}
    line = f"{path}: " + ", ".join(f"{nm}={v:.4g}" for nm, v in values.items())
    return line, {"image": path, "outputs": values}


def _class_result(path: str, probs: Tensor, explained: Tensor, info: ModelInfo,
                  top_k: Optional[int]) -> tuple[str, dict[str, Any]]:
    """A classified image's printed line (its top classes, at least 3, and the explained ones) and its
    summary entry."""
    top = probs.topk(min(max(top_k or 1, 3), probs.shape[0]))
    shown = ", ".join(f"{info.class_name(int(c))} {float(p):.3f}" for p, c in zip(top.values, top.indices))
    names = ", ".join(f"{info.class_name(int(c))} ({int(c)})" for c in explained)
    return f"{path}: {shown}  [explained: {names}]", {
        "image": path,
        "predicted": [{"class": int(c), "name": info.class_name(int(c)), "probability": float(p)}
                      for p, c in zip(top.values, top.indices)],
        "explained": [int(c) for c in explained],
    }


def _write_summary(out_dir: Path, info: ModelInfo, maps: Maps, images: list[dict[str, Any]],
                   errors: Sequence[tuple[str, str]]) -> None:
    """``summary.json``: the model, the methods that ran, each image's entry and the skipped files."""
    atomic_write(out_dir / "summary.json", json.dumps({
        "model": info.name, "methods": list(maps), "images": images,
        "errors": [{"image": p, "error": m} for p, m in errors],
    }, indent=2).encode("utf-8"))
