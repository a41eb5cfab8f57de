"""``salience explain``: saliency maps of image files, as figures (PNG), raw maps (.npy) and a summary."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from salience import targets as _targets
from salience._core.autograd import model_input
from salience._core.errors import SalienceError
from salience._core.files import atomic_write, check_image_file
from salience._core.info import ModelInfo, max_batch, model_info
from salience._core.progress import Progress, progress
from salience._core.tensors import check_int
from salience.cli import explain_many
from salience.cli import options as _options
from salience.cli.common import (EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, METHOD_FLAGS, add_model_args,
                                 check_no_file_in_way, error,
                                 figure, load_model_arg, model_specs_help, output_folder, parse_class, parse_methods,
                                 outputs, probabilities, safe_name, scores, to_image, warn, with_flags)
from salience.cli.inputs import Inputs, add_input_args, class_names, preprocessing_info, read_inputs
from salience.loading import DEFAULT_MAX_PIXELS, load_images, remote, unnormalize
from salience.loading.custom import size_bounds_problem
from salience.loading.images import preprocessing_record
from salience.render import viz
from salience.runs.dataset import one_output_top
from salience.runs.job import call_method
from salience.runs.store import is_run_folder

Maps = dict[str, list[Tensor]]
"""Per method name: a tensor ``(N, ...)`` of every image's map for each of the R targets."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("explain", help="explain image files: figures (PNG) and raw maps (.npy)",
                       description="Explain image files with one or more saliency methods.",
                       epilog="models (--model):\n" + model_specs_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (PNG, JPEG, ...), or a folder, a glob or a .txt list for a dataset run")
    add_model_args(p)
    p.add_argument("--method", action="append", metavar="NAME",
                   help="saliency method (repeat or comma-separate for several; default vanilla; see 'salience list')")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target", metavar="CLASS", help="class index or name to explain (default: predicted)")
    g.add_argument("--top", type=int, metavar="K", help="explain each of the K top classes")
    p.add_argument("--mode", choices=_targets.REGRESSION_MODES, default="increase",
                   help="regression and one-output models: what the map shows (default increase)")
    p.add_argument("--out", "-o", default="salience-out", metavar="DIR", help="output folder (default salience-out)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images over N pixels before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per forward/backward pass (default 16; in a dataset run the same as --batch)")
    pg = p.add_mutually_exclusive_group()
    pg.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    pg.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    add_input_args(p)
    explain_many.add_dataset_args(p)
    _options.add_method_args(p)
    p.set_defaults(func=run)


@dataclass
class Request:
    """What the command line asks for, read and checked before the model is loaded: the methods,
    their options (by keyword), and the preprocessing and class names."""

    methods: list[str]
    options: dict[str, Any]
    inputs: Inputs


def run(args: argparse.Namespace) -> int:
    """Explain ``args.images``: figures, maps and ``summary.json`` in ``args.out``; prints a line per image.
    A folder, glob or list (or an option of dataset runs) makes a dataset run (:mod:`.explain_many`)."""
    if args.batch is not None and args.batch_size is not None and args.batch != args.batch_size:
        raise SalienceError(f"--batch {args.batch} and --batch-size {args.batch_size} are the same option "
                            "(images per pass); give one")
    args.batch = args.batch if args.batch is not None else args.batch_size
    if not args.out.strip():  # said now, not after every map is computed (Path("") is the current folder)
        raise SalienceError("--out is empty; give a folder (e.g. --out results/)")
    check_int(args.max_pixels, "--max-pixels", minimum=1)  # 0 or less skipped every image, one by one
    if explain_many.wants_dataset(args):
        return explain_many.run(args)
    check_no_file_in_way(args.out)  # said now: the folder was made only after every map was computed
    if is_run_folder(args.out):  # its figures were written among the run's files (the lead's decision, session 54)
        raise SalienceError(f"--out {args.out} is a dataset run's folder (salience explain DIR --out made it); the "
                            "figures of image files go to a folder of their own: choose another --out")
    args.batch_size = args.batch if args.batch is not None else 16
    request = _check_args(args)
    model = load_model_arg(args)
    limit = max_batch(model)
    if limit is not None and args.batch_size > limit:  # a program exported with Dim("batch", max=N) refuses more
        args.batch_size = limit
    _options.check_layer(model, request.options)
    info = preprocessing_info(model_info(model), request.inputs)
    if info.task == "regression" and args.top is not None:
        raise SalienceError(f"--top ranks classes, but {info.name} is a regression model; use --target OUTPUT --mode")
    batch, ok_paths, errors = _load_images(args, info, model)
    if batch is None:
        error(f"none of the {len(args.images)} image(s) could be read; nothing explained")
        return EXIT_USAGE  # 1 says some results were written: a script would look for them
    checked, said = _options.top_targets(args.top, info, request.inputs.labels, unnamed=1)
    _options.check_values(model, batch[:1], request.methods, request.options, checked, said)
    out = scores(model, batch, args.batch_size)
    info, names_from = class_names(info, out.shape[1], request.inputs)
    chosen = _choose_targets(args, info, out)
    if chosen.classes.shape[1] > checked:  # names unknown up front: the outputs' count known now, before any map
        _options.check_values(model, batch[:1], request.methods, request.options, chosen.classes.shape[1], said)
    maps, failed = _compute_maps(args, model, batch, chosen, request, _places(args.images, ok_paths))
    if not maps:
        error("every method failed; nothing written")
        return EXIT_USAGE
    _warn_constant(maps, chosen, ok_paths, info)
    out_dir = output_folder(args.out)
    about = _about(args, info, request, names_from)
    n_figures, n_maps = _write_results(args, info, out_dir, batch, out, chosen, maps, ok_paths, errors, about)
    print(f"wrote {n_figures} figure(s) and {n_maps} map(s) to {out_dir}/"
          + (f"; {len(errors)} image(s) skipped" if errors else ""))
    return EXIT_PARTIAL if errors or failed else EXIT_OK


def _check_args(args: argparse.Namespace) -> Request:
    """The method names, their options, the preprocessing and labels; the integer options checked
    (all before any model is loaded)."""
    methods = parse_methods(args.method)
    if args.top is not None:
        check_int(args.top, "--top", minimum=1)
    check_int(args.batch_size, "--batch-size", minimum=1)
    given = _options.given_options(args)
    _options.check_applicable(methods, given)
    return Request(methods, given, read_inputs(args))


def _places(named: Sequence[Any], ok_paths: Sequence[str]) -> list[int]:
    """Each readable image's place among the files named (those that could not be read counted):
    its index as a dataset run of the same files numbers it."""
    places, j = [], 0
    for i, p in enumerate(named):
        if j < len(ok_paths) and str(p) == ok_paths[j]:
            places.append(i)
            j += 1
    return places


def _load_images(args: argparse.Namespace, info: ModelInfo,
                 model: nn.Module) -> tuple[Optional[Tensor], list[str], list[tuple[str, str]]]:
    """The readable images as one batch on the model's device (``None`` if none is), their paths, and
    ``(path, message)`` of the others (each warned about). A FIFO named as an image is refused before any image is
    opened (its open would wait for ever for a writer); a batch outside a ``.pt2`` program's bounded dynamic sizes
    (each image at its own size: ``--resize-mode none``, a model without a size) is refused saying the bounds and
    the flags that resize, not left to torch's guard error."""
    for p in args.images:
        if not remote.is_remote(str(p)):
            check_image_file(p)
    batch, ok_paths, errors = load_images(args.images, info, max_pixels=args.max_pixels)
    for _, msg in errors:
        warn(f"skipped {msg}")
    if batch is not None:  # one batch: each image at the first one's size (load_images)
        problem = size_bounds_problem(info, (int(batch.shape[-2]), int(batch.shape[-1])))
        if problem is not None:
            raise SalienceError(f"{ok_paths[0]}: {problem}")
    # the model's device, and its parameters' dtype (a float64 / float16 python: model)
    return (model_input(model, batch) if batch is not None else None), ok_paths, errors


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
    if k == 1 and args.top is not None and args.top > 1:  # was explained as the one target, silently (the lead's
        # decision, session 54: refused, in a dataset run's words; --top 1 is the one target in both)
        raise SalienceError(one_output_top(args.top, info, flags=True))
    if info.task == "regression" or k == 1:  # one output is a score, not a choice of classes (as dataset runs)
        idx = parse_class(args.target, info, k) if args.target is not None else 0
        return Chosen(torch.full((n, 1), idx, dtype=torch.long), [f"{safe_name(info.class_name(idx))}-{args.mode}"],
                      regression=True, mode=args.mode)
    if args.mode != "increase":  # was ignored: the maps of the class's increase, silently (a dataset run refused it)
        raise SalienceError(f"--mode {args.mode} is for a regression model or a model with one output; {info.name} is "
                            f"a classifier with {outputs(k)}: leave --mode out (its maps show what raises the class)")
    if args.target is not None:
        idx = parse_class(args.target, info, k)
        return Chosen(torch.full((n, 1), idx, dtype=torch.long), ["target"])
    if args.top and args.top > k:
        raise SalienceError(f"--top {args.top} is more than the model's {k} classes; use --top {k} or less")
    classes = out.topk(min(args.top or 1, k), dim=1).indices.cpu()
    return Chosen(classes, [f"top{j + 1}" for j in range(classes.shape[1])])


# --------------------------------------------------------------------------------- maps


def _compute_maps(args: argparse.Namespace, model: nn.Module, batch: Tensor, chosen: Chosen,
                  request: Request, places: Sequence[int]) -> tuple[Maps, list[str]]:
    """Every method's maps (the methods that failed left out, warned about, and named in the list),
    with a progress bar on long work. ``places``: each image's index as a dataset run numbers it
    (SmoothGrad seeds image ``i`` with :func:`salience.runs.job.image_seed`, as a dataset run does)."""
    methods = request.methods
    chunks = list(range(0, batch.shape[0], args.batch_size))
    total = len(methods) * len(chunks)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    maps: Maps = {}
    failed: list[str] = []
    with progress(total, "explain", enabled=show and total > 1) as bar:
        for name in methods:
            fn, _ = _options.bind(name, request.options)
            try:
                every = torch.cat([_chunk_maps(fn, model, batch[s:s + args.batch_size], s, chosen, bar,
                                               places[s:s + args.batch_size]) for s in chunks])
            except SalienceError as e:
                # the library names its keyword; the command line has the flag
                warn(f"method {name} failed: " + with_flags(str(e), METHOD_FLAGS))
                failed.append(name)
                continue
            maps[name] = [every[:, j] for j in range(len(chosen.ranks))]
    return maps, failed


def _warn_constant(maps: Maps, chosen: Chosen, paths: Sequence[str], info: ModelInfo) -> None:
    """A ``salience: warning:`` line per map that is one value everywhere (:func:`viz.constant_map_note`):
    its figure is a flat colour, which the user must not take for a drawing bug. A per-channel map is
    judged as its figure draws it (:func:`display_map`, ``max_c |m|``)."""
    for name, ms in maps.items():
        for j, per_target in enumerate(ms):
            for i, path in enumerate(paths):
                note = viz.constant_map_note(display_map(per_target[i]))
                if note is not None:
                    warn(f"warning: {path} ({name}, {chosen.row_labels(i, info)[j]}): {note}")


def _chunk_maps(fn: Callable[..., Tensor], model: nn.Module, xb: Tensor, start: int, chosen: Chosen,
                bar: Progress, places: Sequence[int]) -> Tensor:
    """One method's maps ``(b, R, ...)`` of the images ``xb`` (from ``start``; ``places``: their indices
    as a dataset run's, for SmoothGrad's per-image seeds): all R targets in one call (a target-free
    method's one map stands for each)."""
    part = call_method(fn, model, xb, chosen.for_chunk(start, xb), places).detach().cpu()
    bar.update(1)
    return part if len(chosen.ranks) > 1 else part.unsqueeze(1)


# --------------------------------------------------------------------------------- files


def _write_results(args: argparse.Namespace, info: ModelInfo, out_dir: Path, batch: Tensor, out: Tensor,
                   chosen: Chosen, maps: Maps, ok_paths: Sequence[str], errors: list[tuple[str, str]],
                   about: dict[str, Any]) -> tuple[int, int]:
    """Each image's figure and maps, its printed line, then ``summary.json``; returns the number of figures and
    of maps written. An image whose files cannot be written (a folder of that name in the way) is warned about,
    listed among the errors (``errors`` grows), and the other images are written."""
    probs = probabilities(out) if not chosen.regression else out
    summary = []
    n_maps = 0
    for i, (path, stem) in enumerate(zip(ok_paths, _unique_stems(ok_paths))):
        picture = to_image(unnormalize(batch[i].cpu(), info))
        try:
            files = {"figure": str(_write_figure(out_dir / f"{stem}.png", picture, i, maps, chosen, info)),
                     "maps": _write_maps(out_dir, stem, i, maps, chosen)}
        except SalienceError as e:
            warn(f"{path}: its results not written: {e}")
            errors.append((path, f"results not written: {e}"))
            continue
        n_maps += len(files["maps"])
        if chosen.regression:
            line, entry = _regression_result(path, out[i], info)
        else:
            line, entry = _class_result(path, probs[i], chosen.classes[i], info, args.top)
        print(line)
        summary.append({**entry, **files})
    _write_summary(out_dir, info, maps, summary, errors, about)
    return len(summary), n_maps


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
        "explained_names": [info.class_name(int(c)) for c in explained],
    }


def _about(args: argparse.Namespace, info: ModelInfo, request: Request, names_from: Optional[str]) -> dict[str, Any]:
    """What ``summary.json`` says of the run beside its results: the model spec, the preprocessing
    used, where the class names came from, and each method's options given on the command line."""
    methods = {}
    for name in request.methods:
        _, taken = _options.bind(name, request.options)
        methods[name] = {k: _options.show_default(v) if callable(v) else v for k, v in taken.items()}
    return {"model_spec": args.model, "weights": args.weights, "preprocessing": preprocessing_record(info),
            "class_names": "labels: " + str(args.labels) if names_from == "labels" else names_from,
            "method_options": methods}


def _write_summary(out_dir: Path, info: ModelInfo, maps: Maps, images: list[dict[str, Any]],
                   errors: Sequence[tuple[str, str]], about: dict[str, Any]) -> None:
    """``summary.json``: the model, the methods that ran, the run's settings (:func:`_about`), each
    image's entry and the skipped files."""
    atomic_write(out_dir / "summary.json", json.dumps({
        "model": info.name, "methods": list(maps), **about, "images": images,
        "errors": [{"image": p, "error": m} for p, m in errors],
    }, indent=2).encode("utf-8"))
