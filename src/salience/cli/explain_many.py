"""``salience explain DIR|GLOB|LIST.txt --out RUN/``: a dataset run (:func:`salience.explain_dataset`).

``salience explain`` runs this when an input names many images (a folder, a glob, a ``.txt``
list) or an option of dataset runs is given (``--dataset``, ``--labels-csv``, ``--metrics``,
``--engine`` ...); image files alone keep the one-shot figures and ``.npy`` files.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

import torch

from salience._core.autograd import model_input
from salience._core.errors import SalienceError
from salience._core.info import attach_info, model_info
from salience._core.tensors import check_int
from salience.cli import options as _options
from salience.cli.common import (EXIT_OK, EXIT_PARTIAL, METHOD_FLAGS, RUN_FLAGS, flag_errors, load_model_arg,
                                 parse_class, parse_methods, warn, writable_out)
from salience.cli.inputs import class_names, preprocessing_info, read_inputs
from salience.runs import explain_dataset
from salience.runs.dataset import ENGINES, METRICS
from salience.runs.job import constant_notes
from salience.runs.sources import is_dataset_spec, needs_one_size
from salience.runs.store import error_column, metrics_error_column

FLAGS = {"labels=": "--labels-csv", "masks=": "--masks", "out=": "--out", **RUN_FLAGS,
         "target=": "--target", "mode=": "--mode", "engine='ray'": "--engine ray", "num_gpus=": "--num-gpus",
         "actors=": "--actors", "address=": "--address", "device=": "--device",
         'map_dtype="float32"': "--map-dtype float32", **METHOD_FLAGS}
"""The keywords of :func:`salience.explain_dataset` that its errors name, as this command's flags."""

KEYWORD_FLAGS = {"top": "--top", "mode": "--mode"}
"""The keywords of :func:`salience.explain_dataset` whose refusals name them bare, without an ``=`` (``top must be an
int >= 1, got 0``, ``top 9 is more than the model's 5 classes; use top 5 or less``, ``mode 'decrease' is for a
regression model ...: leave mode out``), each by the flag that gives it. :func:`_explain` passes them: each one it
passes with a value of the user's (not the function's default) is said as its flag in a refusal (:func:`_flags`),
as a run of image files says it; the messages' wording is not searched for phrases."""

_DEFAULTS = {k: inspect.signature(explain_dataset).parameters[k].default for k in KEYWORD_FLAGS}
"""The default of each keyword of :data:`KEYWORD_FLAGS` in :func:`salience.explain_dataset`'s signature: a keyword
passed with it is not the user's."""

_DATASET_FLAGS = ("dataset", "labels_csv", "masks", "metrics", "png", "overwrite", "engine", "num_gpus", "workers",
                  "actors", "address", "shard_size", "map_dtype")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """The options of dataset runs (any of them makes ``explain`` a dataset run)."""
    g = p.add_argument_group("dataset runs", "  an input that is a folder, a glob or a .txt list (or any option "
                             "below) makes a resumable run in --out: maps, index.parquet, index.html")
    g.add_argument("--dataset", action="store_true", default=None, help="a dataset run even for image files")
    g.add_argument("--batch", type=int, metavar="B", help="images per batch (default: chosen from memory; "
                   "for image files, 16); --batch-size is the same option")
    g.add_argument("--labels-csv", metavar="CSV", help="path,label per line: explain the label, mark right / wrong")
    g.add_argument("--masks", metavar="DIR", help="object masks by file stem: pointing game and energy with --metrics")
    g.add_argument("--metrics", nargs="?", const="all", metavar="NAMES",
                   help=f"add metric columns: all (default) or some of {','.join(METRICS)}")
    g.add_argument("--png", action="store_true", default=None, help="also write each map's overlay (overlays/)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="start again in an existing run folder made by another command")
    g.add_argument("--engine", choices=ENGINES, default=None, help="local (default) or ray (a Ray cluster)")
    g.add_argument("--num-gpus", type=float, default=None, metavar="G", help="GPUs per Ray actor (default 0)")
    g.add_argument("--actors", type=int, default=None, metavar="N", help="Ray actors, one model each")
    g.add_argument("--address", default=None, metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS, or "
                   "a local cluster)")
    g.add_argument("--workers", type=int, default=None, metavar="N", help="image decoding processes (default: up "
                   "to 4, a core left to the model)")
    g.add_argument("--shard-size", type=int, default=None, metavar="N", help="images per shard file (default 256)")
    g.add_argument("--map-dtype", choices=("float16", "float32"), default=None, help="stored maps (default float16)")


def wants_dataset(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a dataset run."""
    return any(getattr(args, f, None) is not None for f in _DATASET_FLAGS) or any(
        is_dataset_spec(i) for i in args.images)


def _metrics(text: Any, masks: bool) -> Any:
    if text is None:
        return False
    if text == "all":
        return True
    return [m.strip() for m in text.split(",") if m.strip()]


def _warn_constant(table: Any, methods: list[str]) -> None:
    """A ``salience: warning:`` line per method and kind of constant map in the run's table
    (:func:`salience.runs.job.constant_notes`, every target's map): a run of 10,000 images of an
    untrained model says it once a method."""
    for text in constant_notes(table, methods):
        warn(f"warning: {text}")


def run(args: argparse.Namespace) -> int:
    """The dataset run the command line asks for; prints the count of failed images at the end."""
    methods = parse_methods(args.method)
    given = _options.given_options(args)
    _options.check_applicable(methods, given)
    inputs = read_inputs(args)
    for flag in ("batch", "workers", "shard_size", "actors"):
        if getattr(args, flag) is not None:
            check_int(getattr(args, flag), "--" + flag.replace("_", "-"), minimum=0 if flag == "workers" else 1)
    writable_out(args.out)  # an unwritable folder was an unexpected PermissionError (exit 3) at the run's lock file
    model = load_model_arg(args)
    _options.check_layer(model, given)
    info = preprocessing_info(model_info(model), inputs)
    if inputs.labels is not None:
        info, _ = class_names(info, len(inputs.labels), inputs)
    attach_info(model, info)
    if given and info.input_size is not None:  # the values checked before the run folder is made (as for files)
        _options.check_values(model, model_input(model, torch.zeros(1, info.channels, *info.input_size)), methods,
                              given, *_options.top_targets(args.top, info))
    fns = {name: _options.bind(name, given)[0] for name in methods}
    taken = {name: _options.bind(name, given)[1] for name in methods}
    target = parse_class(args.target, info, len(info.class_names or ()) or 10 ** 9) if args.target else None
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    if info.input_size is None:  # the command's inputs are image files: said with its flag, not Python's keyword
        raise needs_one_size(info.name, "give --size H,W")
    run_ = _explain(args, model, fns, target, show, taken)
    _warn_constant(run_.table, methods)
    errors = run_.failed()  # the image's own error, or a method's or its metrics' (METHOD.error, METHOD.metrics_error)
    print(f"explained {len(run_) - errors} of {len(run_)} image(s) into {args.out}/ (index.parquet, index.html)"
          + (f"; {errors} image(s) failed: see {_said_columns(run_)}" if errors else ""))
    if not run_.complete:
        raise SalienceError(f"the run in {args.out} is not complete; run the same command again")
    return EXIT_PARTIAL if errors else EXIT_OK


def _said_columns(run: Any) -> str:
    """The columns of ``run``'s table that say why its failed images failed, for the summary line: ``error`` (the
    image's own) and each method's ``METHOD.error`` and ``METHOD.metrics_error`` that holds one."""
    t = run.table
    names = ["error"] + [c(m) for m in run.methods for c in (error_column, metrics_error_column)]
    found = [f"'{c}'" for c in names if c in t.column_names and t.column(c).null_count < t.num_rows]
    if len(found) < 2:
        return f"the {''.join(found) or repr('error')} column"
    return f"the {', '.join(found[:-1])} and {found[-1]} columns"


def _explain(args: argparse.Namespace, model: Any, fns: dict, target: Any, show: bool, taken: dict) -> Any:
    """The dataset run the arguments describe (:func:`salience.explain_dataset`), its refusals said with the
    command's flags (:func:`_flags`)."""
    keywords = dict(
        target=target, top=args.top, mode=args.mode, labels=args.labels_csv,
        masks=args.masks, metrics=_metrics(args.metrics, args.masks is not None),
        batch_size=args.batch, workers=args.workers, shard_size=args.shard_size or 256, png=bool(args.png),
        overwrite=bool(args.overwrite), engine=args.engine or "local", num_gpus=args.num_gpus or 0,
        actors=args.actors, address=args.address, map_dtype=args.map_dtype or "float16",
        max_pixels=args.max_pixels, weights=args.weights, method_options=taken, show_progress=show,
        model_spec=args.model, memory_format=getattr(args, "memory_format", None),
        compile=getattr(args, "compile", None), precision=getattr(args, "precision", None),
        fold_batchnorm=getattr(args, "fold_batchnorm", None))
    with flag_errors(_flags(keywords), args):
        return explain_dataset(model, list(args.images), fns, args.out, **keywords)


def _flags(keywords: dict[str, Any]) -> dict[str, str]:
    """What a refusal of :func:`salience.explain_dataset` called with ``keywords`` says as flags: :data:`FLAGS`, and
    the flag of each keyword of :data:`KEYWORD_FLAGS` passed with another value than the function's default (a
    refusal is of a value the user gave; the word ``mode`` in a message about another thing, a model's train mode,
    is left alone when ``--mode`` was not given)."""
    passed = {k: flag for k, flag in KEYWORD_FLAGS.items() if keywords[k] != _DEFAULTS[k]}
    return {**FLAGS, **passed}  # FLAGS first: "mode=MODE" is "--mode MODE" before the bare "mode" is looked for
