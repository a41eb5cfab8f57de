"""The ``salience`` command: the only place that maps strings to functions.

Commands: ``explain`` (saliency maps of image files), ``demo`` (an HTML report on the bundled
demo models), ``list``, ``visualize`` (class model images) and ``evaluate`` (metrics).

Exit codes: 0 success; 1 some inputs failed (the others' results are written); 2 bad
arguments, model, method or target (nothing explained); 3 an unexpected internal error (set
``SALIENCE_DEBUG=1`` for its traceback); 130 interrupted. Every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from salience import __version__
from salience.render import viz
from salience._core.errors import SalienceError
from salience._core.files import atomic_write
from salience.methods import METHODS
from salience.reduce import GRAD_MODIFIERS, REDUCTIONS

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

DEMO_SEED = 10_000
"""Seed of the demo report's images: the demo models' held-out set (never trained on)."""


def _err(msg: str) -> None:
    print(f"salience: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"salience: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------- helpers


def parse_methods(values: Optional[Sequence[str]]) -> list[str]:
    """``["vanilla,gradcam", "smoothgrad"]`` -> known method names, in order, without repeats."""
    names: list[str] = []
    for v in values or ["vanilla"]:
        for name in v.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise SalienceError("--method got no method name; e.g. --method vanilla")
    from salience._core.errors import suggest

    for name in names:
        if name not in METHODS:
            raise SalienceError(
                f"unknown method {name!r}{suggest(name, list(METHODS))} (available: {', '.join(METHODS)})"
            )
    return names


def parse_class(value: str, info: Any, num_outputs: int) -> int:
    """A class given as an index or a name (case-insensitive) -> its index, checked against the model."""
    names = list(info.class_names or ())
    v = value.strip()
    if re.fullmatch(r"-?\d+", v):
        idx = int(v)
    else:
        lowered = [n.lower() for n in names]
        if v.lower() not in lowered:
            from salience._core.errors import suggest

            known = f" (classes: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else \
                " (the model has no class names; give an index)"
            raise SalienceError(f"unknown target class {v!r}{suggest(v, names)}{known}")
        idx = lowered.index(v.lower())
    if not 0 <= idx < num_outputs:
        labels = f": {', '.join(names)}" if names and len(names) <= 10 else ""
        raise SalienceError(
            f"target class {idx} is out of range for {info.name} with {num_outputs} outputs "
            f"(valid: 0..{num_outputs - 1}{labels})"
        )
    return idx


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def forward(model: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """The model's output for ``x`` ``(B, C, H, W)``, in eval mode, no gradients, in chunks."""
    from salience._core.autograd import unwrap_output
    from salience._core.guard import model_guard

    outs = []
    with model_guard(model), torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            outs.append(unwrap_output(model(x[s:s + batch_size])).detach())
    out = torch.cat(outs)
    return out.reshape(out.shape[0], -1) if out.dim() != 2 else out


def probabilities(out: Tensor) -> Tensor:
    """Class probabilities: ``out`` itself if it already is (rows of a softmax), else its softmax."""
    from salience._core.autograd import looks_like_probabilities

    return out if looks_like_probabilities(out) else out.float().softmax(dim=1)


def display_map(m: Tensor) -> Tensor:
    """A map for a picture: ``(H, W)``; a per-channel map ``(C, H, W)`` becomes ``max_c |m|``."""
    return m.abs().amax(0) if m.dim() == 3 else m


def _figure(images: Tensor, maps: dict[str, Tensor], row_labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """The side-by-side figure (:func:`salience.viz.figure`): a row per image, then each map and
    its overlay; small images (the 64-pixel demo shapes) are enlarged to 160-pixel tiles."""
    tile = max(int(images.shape[-2]), 160)
    return viz.figure(images, maps, row_labels=row_labels, scale_to=tile)


def _strip(images: Tensor, tile: int = 160, pad: int = 4) -> np.ndarray:
    """Images ``(B, C, H, W)`` side by side, enlarged to ``tile`` pixels, as uint8 ``(H, W, 3)``."""
    from PIL import Image

    cells = []
    for img in images:
        arr = viz.to_uint8_image(img)
        arr = np.asarray(Image.fromarray(arr).resize((tile, tile), Image.NEAREST))
        cells += [arr, np.full((tile, pad, 3), 255, np.uint8)]
    return np.concatenate(cells[:-1], axis=1)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _unique_stems(paths: Sequence[str]) -> list[str]:
    stems: list[str] = []
    seen: dict[str, int] = {}
    for p in paths:
        stem = _safe(Path(p).stem)
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}-{n + 1}")
    return stems


def _to_image(x: Tensor) -> Tensor:
    """An image tensor ``(1|3, H, W)`` -> ``(3, H, W)`` for pictures."""
    return x.repeat(3, 1, 1) if x.shape[0] == 1 else x[:3]


# --------------------------------------------------------------------------------- explain


def _with_options(fn: Callable[..., Tensor], **options: Any) -> Callable[..., Tensor]:
    """``fn`` with those of ``options`` that it takes as keywords (the others are for other methods)."""
    import functools
    import inspect

    # Named parameters only (not _engine.accepts, which also says yes to **options: smoothgrad
    # would hand unsupported= on to vanilla, which has no such option).
    params = inspect.signature(fn).parameters
    taken = {k: v for k, v in options.items() if k in params}
    return functools.partial(fn, **taken) if taken else fn


def _cmd_explain(args: argparse.Namespace) -> int:
    from salience._core.info import model_info
    from salience._core.progress import progress
    from salience.loading import load_images, load_model, unnormalize
    from salience.targets import regression

    methods = parse_methods(args.method)
    if args.top is not None and args.top < 1:
        raise SalienceError(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        raise SalienceError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle, device=args.device)
    info = model_info(model)
    regress = info.task == "regression"
    if regress and args.top is not None:
        raise SalienceError(f"--top ranks classes, but {info.name} is a regression model; use --target OUTPUT --mode")

    batch, ok_paths, errors = load_images(args.images, info, max_pixels=args.max_pixels)
    for _, msg in errors:
        _warn(f"skipped {msg}")
    if batch is None:
        _err(f"none of the {len(args.images)} image(s) could be read; nothing explained")
        return EXIT_PARTIAL
    batch = batch.to(_device(model))
    out = forward(model, batch, args.batch_size)
    n, k = out.shape

    # What to explain: R targets per image, the classes in chosen (N, R), a file label per rank.
    if regress:
        idx = parse_class(args.target, info, k) if args.target is not None else 0
        ranks = [f"{_safe(info.class_name(idx))}-{args.mode}"]
        chosen = torch.full((n, 1), idx, dtype=torch.long)
    else:
        if args.target is not None:
            idx = parse_class(args.target, info, k)
            chosen = torch.full((n, 1), idx, dtype=torch.long)
        else:
            r = min(args.top or 1, k)
            if args.top and args.top > k:
                raise SalienceError(f"--top {args.top} is more than the model's {k} classes; use --top {k} or less")
            chosen = out.topk(r, dim=1).indices.cpu()
        ranks = [f"top{j + 1}" if args.target is None else "target" for j in range(chosen.shape[1])]

    # Saliency: every method x chunk, all R targets of a chunk in one call (methods take (b, R)
    # class tensors and share the forward pass between them), with a progress bar on long work.
    chunks = list(range(0, n, args.batch_size))
    total = len(methods) * len(chunks)
    maps: dict[str, list[Tensor]] = {m: [] for m in methods}  # per method: R tensors (N, ...)
    failed: list[str] = []
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    with progress(total, "explain", enabled=show and total > 1) as bar:
        for name in methods:
            fn = _with_options(METHODS[name], unsupported=args.unsupported)
            try:
                parts = []
                for s in chunks:
                    xb = batch[s:s + args.batch_size]
                    if regress:
                        part = fn(model, xb, regression(idx, args.mode)).detach().cpu().unsqueeze(1)
                    elif len(ranks) == 1:
                        part = fn(model, xb, chosen[s:s + xb.shape[0], 0].to(xb.device)).detach().cpu().unsqueeze(1)
                    else:
                        part = fn(model, xb, chosen[s:s + xb.shape[0]].to(xb.device)).detach().cpu()
                    parts.append(part)  # (b, R, ...)
                    bar.update(1)
                every = torch.cat(parts)
                maps[name] = [every[:, j] for j in range(len(ranks))]
            except SalienceError as e:
                hint = (" (--unsupported warn passes their plain gradient instead)"
                        if "unsupported" in str(e) and args.unsupported == "error" else "")
                _warn(f"method {name} failed: {e}{hint}")
                failed.append(name)
                maps.pop(name)
    if not maps:
        _err("every method failed; nothing written")
        return EXIT_USAGE

    # Files: one figure per image (rows: targets; columns: image + methods) and raw maps.
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SalienceError(f"cannot create the output folder {out_dir} ({e.strerror or e})") from None
    probs = probabilities(out) if not regress else out
    stems = _unique_stems(ok_paths)
    summary = []
    n_maps = 0
    for i, (path, stem) in enumerate(zip(ok_paths, stems)):
        picture = _to_image(unnormalize(batch[i].cpu(), info))
        rows = picture.unsqueeze(0).repeat(len(ranks), 1, 1, 1)
        fig_maps = {name: torch.stack([display_map(ms[j][i]) for j in range(len(ranks))]) for name, ms in maps.items()}
        fig_path = out_dir / f"{stem}.png"
        row_labels = ([info.class_name(int(chosen[i, 0])) + f" {args.mode}"] if regress else
                      [f"{label}: {info.class_name(int(chosen[i, j]))}" for j, label in enumerate(ranks)])
        viz.save_png(fig_path, _figure(rows, fig_maps, row_labels))
        files = {"figure": str(fig_path), "maps": []}
        for name, ms in maps.items():
            for j, label in enumerate(ranks):
                cls = int(chosen[i, j])
                tag = label if regress else f"{label}-class{cls}"
                npy = out_dir / f"{stem}_{_safe(name)}_{tag}.npy"
                viz.save_npy(npy, ms[j][i].numpy())
                files["maps"].append(str(npy))
                n_maps += 1
        if regress:
            values = {info.class_name(j): float(out[i, j]) for j in range(k)}
            print(f"{path}: " + ", ".join(f"{nm}={v:.4g}" for nm, v in values.items()))
            summary.append({"image": path, "outputs": values, **files})
        else:
            top = probs[i].topk(min(max(args.top or 1, 3), k))
            shown = ", ".join(f"{info.class_name(int(c))} {float(p):.3f}" for p, c in zip(top.values, top.indices))
            explained = ", ".join(f"{info.class_name(int(c))} ({int(c)})" for c in chosen[i])
            print(f"{path}: {shown}  [explained: {explained}]")
            summary.append({
                "image": path,
                "predicted": [{"class": int(c), "name": info.class_name(int(c)), "probability": float(p)}
                              for p, c in zip(top.values, top.indices)],
                "explained": [int(c) for c in chosen[i]],
                **files,
            })
    atomic_write(out_dir / "summary.json", json.dumps({
        "model": info.name, "methods": list(maps), "images": summary,
        "errors": [{"image": p, "error": m} for p, m in errors],
    }, indent=2).encode("utf-8"))
    print(f"wrote {len(ok_paths)} figure(s) and {n_maps} map(s) to {out_dir}/"
          + (f"; {len(errors)} image(s) skipped" if errors else ""))
    return EXIT_PARTIAL if errors or failed else EXIT_OK


# --------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from salience.demo import data, zoo
    from salience.render.report import Report
    from salience.targets import regression

    start = time.perf_counter()
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SalienceError(f"cannot create the output folder {out_dir} ({e.strerror or e})") from None
    rep = Report(
        "salience demo",
        f"Saliency maps of the bundled demo models on {args.n} held-out shapes images (seed {DEMO_SEED}), "
        f"made by salience {__version__} with every method it has ({', '.join(METHODS)}).",
    )

    # 1. Classification: every method side by side.
    model = zoo.load_demo("shapes")
    info = model.salience_info
    images, labels, _ = data.shapes(args.n, seed=DEMO_SEED)
    out = forward(model, images)
    probs, pred = probabilities(out), out.argmax(1)
    maps: dict[str, Tensor] = {}
    notes = []
    for name, fn in METHODS.items():
        try:
            maps[name] = fn(model, images, pred).detach()
        except Exception as e:  # noqa: BLE001 - one broken method must not sink the report
            notes.append(f"{name}: failed ({type(e).__name__}: {e})")
    rep.heading("Which pixels decided the class? (demo:shapes)")
    rep.paragraph(
        "Each row is one image; the first column is the image, then one column per method, each map "
        "explaining the predicted class's score before softmax."
    )
    fig = out_dir / "classification.png"
    arr = _figure(images, maps, [
        f"{info.class_name(int(labels[i]))} -> {info.class_name(int(pred[i]))}" for i in range(images.shape[0])])
    viz.save_png(fig, arr)
    rep.figure(fig, "rows: images; columns: image, " + ", ".join(maps))
    rep.table(
        ["row", "true class", "predicted", "probability", ""],
        [
            (i + 1, info.class_name(int(labels[i])), info.class_name(int(pred[i])), f"{float(probs[i, pred[i]]):.3f}",
             "ok" if int(labels[i]) == int(pred[i]) else "WRONG")
            for i in range(args.n)
        ],
    )
    for note in notes:
        rep.paragraph(note, css="bad")

    # 2. Regression: what increases, decreases or keeps each output.
    reg = zoo.load_demo("shapes-regression")
    rinfo = reg.salience_info
    r_images = images[: min(4, args.n)]
    r_out = forward(reg, r_images)
    vanilla = METHODS["vanilla"]
    rep.heading("Regression targets (demo:shapes-regression)")
    rep.paragraph(
        "Vanilla gradients of each regressed output: 'increase' shows what would raise it, 'decrease' what "
        "would lower it, 'maintain' the pixels it is least sensitive to (|1/gradient|)."
    )
    for j, oname in enumerate(rinfo.class_names or ("output",)):
        rmaps = {mode: vanilla(reg, r_images, regression(j, mode)).detach() for mode in ("increase", "decrease", "maintain")}
        path = out_dir / f"regression_{_safe(oname)}.png"
        arr = _figure(r_images, rmaps)
        viz.save_png(path, arr)
        vals = ", ".join(f"{float(v):.3f}" for v in r_out[:, j])
        rep.figure(path, f"{oname}: columns image, increase, decrease, maintain; predicted {vals}")

    # 3. Class model visualization, if this installation has it.
    from salience.demo.clever_hans import clever_hans_report
    from salience.methods.class_model import class_model

    rep.heading("What each class looks like to the model (class model visualization)")
    try:
        names = list(info.class_names or ())
        grid = class_model(model, list(range(len(names))), shape=(3, 64, 64), steps=args.class_model_steps,
                           seed=0.5, generator=torch.Generator().manual_seed(0)).detach().cpu()
        path = out_dir / "class_models.png"
        viz.save_png(path, _strip(grid))
        rep.figure(path, "the image that maximizes each class's score (L2, total variation, jitter, blur), "
                   "left to right: " + ", ".join(names))
    except Exception as e:  # noqa: BLE001 - one broken section must not sink the report
        notes.append(f"class model visualization: failed ({type(e).__name__}: {e})")
        rep.paragraph(notes[-1], css="bad")

    # 4. The Clever Hans check.
    rep.heading("Clever Hans: does the model look at the shape or at a cue?")
    try:
        rep.raw(clever_hans_report(out_dir))
    except Exception as e:  # noqa: BLE001
        notes.append(f"Clever Hans section: failed ({type(e).__name__}: {e})")
        rep.paragraph(notes[-1], css="bad")

    rep.paragraph(f"Made in {time.perf_counter() - start:.1f} s.", css="note")
    index = rep.write(out_dir / "index.html")
    print(f"demo report: {index.resolve()}")
    print("open it in a browser, e.g. python -m webbrowser " + str(index.resolve()))
    return EXIT_OK if not notes else EXIT_PARTIAL


# --------------------------------------------------------------------------------- others


def _cmd_list(args: argparse.Namespace) -> int:
    from salience.demo import zoo

    print("methods:")
    for name, fn in METHODS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0].replace("``", "") if fn.__doc__ else ""
        print(f"  {name:<20} {doc}")
    print("targets: predicted (default), --target CLASS (index or name), --top K; regression models: "
          "--target OUTPUT --mode increase|decrease|maintain")
    print("reductions:", ", ".join(REDUCTIONS))
    print("grad modifiers:", ", ".join(GRAD_MODIFIERS))
    print("models:")
    for name, desc in zoo.DEMOS.items():
        print(f"  demo:{name:<18} {desc}")
    print("  torchvision:ARCH        any torchvision classifier (--weights FILE | random; default: pretrained)")
    print("  FILE                    TorchScript (.pt), Keras (.keras/.h5), ONNX (.onnx, needs onnx2torch)")
    return EXIT_OK


def _cmd_visualize(args: argparse.Namespace) -> int:
    from salience._core.info import model_info
    from salience.loading import load_model
    from salience.methods.class_model import class_model

    model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle, device=args.device)
    info = model_info(model)
    k = forward(model, torch.zeros(1, info.channels, *(info.input_size or (args.size, args.size)),
                                    device=_device(model))).shape[1]
    target = parse_class(args.target, info, k)
    h, w = info.input_size or (args.size, args.size)
    kwargs: dict[str, Any] = {"shape": (info.channels, h, w), "progress": sys.stderr.isatty()}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    img = class_model(model, target, **kwargs).detach().cpu()
    from salience.loading import unnormalize

    pic = _to_image(unnormalize(img[0], info)) if info.mean is not None else _to_image(img[0].clamp(0, 1))
    arr = (pic.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viz.save_png(out, arr)
    print(f"class model of {info.class_name(target)} ({target}): {out}")
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from salience.evidence import evaluate
    from salience.demo.train import demo_train_fn
    from salience.loading import load_model

    if args.masks is not None and args.images is None:
        raise SalienceError("--masks needs its images: give --images DIR too (a mask per image, same file names)")
    for opt in ("n", "steps", "randomization_images"):
        if getattr(args, opt) < 1:
            raise SalienceError(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")
    model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle, device=args.device)
    kwargs: dict[str, Any] = {"n": args.n, "steps": args.steps, "randomization_images": args.randomization_images,
                              "progress": sys.stderr.isatty()}
    if args.images is not None:
        kwargs["images"] = args.images
    if args.masks is not None:
        kwargs["masks"] = args.masks
    if args.method:
        kwargs["methods"] = parse_methods(args.method)
    if args.data_randomization:
        if not args.model.startswith("demo:shapes") or args.model == "demo:shapes-regression":
            raise SalienceError("--data-randomization retrains the demo recipe, so it needs a demo:shapes classifier")
        kwargs.update(train_fn=demo_train_fn(epochs=6), train_images=2000)
    report = evaluate.run_evaluation(model, args.out, **kwargs)
    print(f"evaluation written to {args.out}")
    print(f"report: {Path(report).resolve()}")
    return EXIT_OK


# --------------------------------------------------------------------------------- parser


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", "-m", required=required, metavar="MODEL",
                   help="demo:NAME, torchvision:ARCH, or a model file (TorchScript, .keras/.h5, .onnx)")
    p.add_argument("--weights", metavar="FILE",
                   help="state dict for torchvision:ARCH ('random' for random weights; default: pretrained)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling the model file (can run arbitrary code: only for files you trust)")
    p.add_argument("--device", default=None, help="e.g. cuda or cpu (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    from salience.loading import DEFAULT_MAX_PIXELS

    parser = argparse.ArgumentParser(
        prog="salience",
        description="Saliency maps for PyTorch image models: which pixels made the model decide.",
        epilog="Exit codes: 0 ok, 1 some inputs failed (others written), 2 bad arguments/model/method/target, "
               "3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"salience {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("explain", help="explain image files: figures (PNG) and raw maps (.npy)",
                       description="Explain image files with one or more saliency methods.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    _model_args(p)
    p.add_argument("--method", action="append", metavar="NAME",
                   help="saliency method (repeat or comma-separate for several; default vanilla; see 'salience list')")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target", metavar="CLASS", help="class index or name to explain (default: predicted)")
    g.add_argument("--top", type=int, metavar="K", help="explain each of the K top classes")
    p.add_argument("--mode", choices=("increase", "decrease", "maintain"), default="increase",
                   help="regression models: what the map shows (default increase)")
    p.add_argument("--out", "-o", default="salience-out", metavar="DIR", help="output folder (default salience-out)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images over N pixels before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per forward/backward pass")
    p.add_argument("--unsupported", choices=("error", "warn", "ignore"), default="error",
                   help="guided backprop / deconvnet on activations the rule is not defined for (GELU, SiLU, ...): "
                        "refuse (default), or pass their plain gradient with a warning or silently")
    pg = p.add_mutually_exclusive_group()
    pg.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    pg.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("demo", help="an HTML report on the bundled demo models (no downloads)")
    p.add_argument("--out", "-o", default="salience-demo", metavar="DIR", help="output folder (default salience-demo)")
    p.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--class-model-steps", type=int, default=300, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("list", help="list the methods, targets, models and options available")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("visualize", help="the image a model finds most typical of a class (class model)")
    _model_args(p)
    p.add_argument("--target", required=True, metavar="CLASS", help="class index or name")
    p.add_argument("--out", "-o", default="class.png", metavar="PNG")
    p.add_argument("--steps", type=int, default=None, help="optimization steps")
    p.add_argument("--size", type=int, default=224, help="image side when the model does not say (default 224)")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("evaluate", help="saliency metrics (pointing game, deletion, Clever Hans check)")
    _model_args(p)
    p.add_argument("--images", metavar="DIR", help="folder of images (default: held-out demo shapes)")
    p.add_argument("--masks", metavar="DIR",
                   help="folder of ground-truth masks, same file names (without: no localization metrics)")
    p.add_argument("--method", action="append", metavar="NAME", help="methods to evaluate (default: all)")
    p.add_argument("--n", type=int, default=64, help="held-out demo images when no --images (default 64)")
    p.add_argument("--steps", type=int, default=24, help="deletion/insertion steps (default 24)")
    p.add_argument("--randomization-images", type=int, default=8, metavar="N",
                   help="images for the model randomization test (default 8)")
    p.add_argument("--data-randomization", action="store_true",
                   help="also retrain the demo recipe on true and shuffled labels and compare maps (about 10 min)")
    p.add_argument("--out", "-o", default="salience-eval", metavar="DIR")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or argparse's own usage error
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.func(args))
    except SalienceError as e:
        _err(str(e))
        return EXIT_USAGE
    except MemoryError:
        _err("out of memory; use fewer or smaller images (--batch-size, --max-pixels)")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into head
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen model: one line, traceback on request
        import os

        if os.environ.get("SALIENCE_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _err(f"unexpected {type(e).__name__}: {first} (set SALIENCE_DEBUG=1 to see the traceback, and "
             "please report it)")
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
