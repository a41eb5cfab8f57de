"""``salience evaluate``: saliency metrics (pointing game, deletion, randomization, Clever Hans) as a report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from salience._core.errors import SalienceError
from salience._core.tensors import check_int
from salience.cli import options as _options
from salience.cli.common import (EXIT_OK, EXIT_PARTIAL, METHOD_FLAGS, add_model_args, check_no_file_in_way, flag_errors,
                                 load_model_arg, parse_methods, warn)
from salience.demo.train import demo_train_fn
from salience.evidence import evaluate
from salience.evidence.sanity import NO_HOOKS
from salience.methods import METHODS

DELETION_STEPS = 24
"""The deletion / insertion steps without ``--deletion-steps``."""
STEPS_NOTE = ("--steps is integrated gradients' option (its path steps), as on salience explain; the deletion / "
              "insertion steps are --deletion-steps (which --steps set before)")
"""Said when ``--steps`` comes without ``--deletion-steps``: an old script's ``--steps 24`` now sets
another number, so it is not taken silently."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="saliency metrics (pointing game, deletion, Clever Hans check)")
    add_model_args(p)
    p.add_argument("--images", metavar="DIR", help="folder of images (default: held-out demo shapes)")
    p.add_argument("--masks", metavar="DIR",
                   help="folder of ground-truth masks, same file names (without: no localization metrics)")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="methods to evaluate (repeat or comma-separate; default: those that apply to the model, "
                        "which 'salience list --model MODEL' names)")
    p.add_argument("--n", type=int, default=64, help="held-out demo images when no --images (default 64)")
    p.add_argument("--deletion-steps", type=int, default=None, metavar="N",
                   help=f"deletion/insertion steps (default {DELETION_STEPS}; --steps is integrated gradients')")
    p.add_argument("--randomization-images", type=int, default=8, metavar="N",
                   help="images for the model randomization test (default 8)")
    p.add_argument("--data-randomization", action="store_true",
                   help="also retrain the demo recipe on true and shuffled labels and compare maps (about 10 min)")
    p.add_argument("--probability", choices=("softmax", "sigmoid"), default="softmax",
                   help="how deletion, insertion and ROAD score the class: softmax over the classes (default), or "
                        "each class's own sigmoid (a multilabel model)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out the --images that cannot be read (each named on stderr; the report says N of M "
                        "images, results.json's skipped lists them; exit 1); default: refuse the evaluation")
    p.add_argument("--out", "-o", default="salience-eval", metavar="DIR")
    _options.add_method_args(p)
    p.set_defaults(func=run)


FLAGS = {"images=": "--images", "masks=": "--masks", "out_dir=": "--out", "skip_unreadable=True": "--skip-unreadable",
         **METHOD_FLAGS}
"""The keywords of :func:`salience.evidence.evaluate.run_evaluation` that its errors name, as this command's flags."""


def _check_applicable(methods: Sequence[str], given: dict[str, Any]) -> None:
    """:func:`salience.cli.options.check_applicable`; a refused ``--steps`` also says where the
    deletion steps went."""
    try:
        _options.check_applicable(methods, given)
    except SalienceError as e:
        if str(e).startswith("--steps "):
            raise SalienceError(f"{e}; the deletion / insertion steps are --deletion-steps") from None
        raise


def default_choice(model: nn.Module, x: Tensor, given: dict[str, Any]) -> list[str]:
    """The methods run without ``--method``: :func:`salience.evidence.evaluate.default_names` with ``--grid`` /
    ``--prefix-tokens`` given to each method that takes them (the CAMs and attention methods kept where they read
    the tokens), the choice the Python API makes for the same options."""
    tokens = {k: v for k, v in given.items() if k in ("grid", "prefix_tokens")}
    return evaluate.default_names(model, x, {name: taken for name in METHODS if (taken := _options.bind(name, tokens)[1])})


def _method_options(args: argparse.Namespace, model: nn.Module, methods: Optional[list[str]],
                    given: dict[str, Any]) -> tuple[Optional[list[str]], dict[str, dict[str, Any]]]:
    """The methods (the defaults chosen here when options are given) and each one's options, bound as
    ``salience explain`` binds them: the layer looked up in the model and every value checked by the
    methods on the first image, before any work."""
    _options.check_layer(model, given)
    if not given:
        return methods, {}
    with flag_errors(FLAGS, args):
        skip = getattr(args, "skip_unreadable", False)  # a Namespace made by a caller may lack it
        x = evaluate.evaluation_input(model, args.images, n=args.n, skip_unreadable=skip)
    if methods is None:
        methods = default_choice(model, x, given)
        _check_applicable(methods, given)
    _options.check_values(model, x, methods, given)
    return methods, {name: taken for name in methods if (taken := _options.bind(name, given)[1])}


def run(args: argparse.Namespace) -> int:
    """Evaluate the methods on the model; the report, tables and figures go to ``args.out``."""
    check_no_file_in_way(args.out)  # mkdir said "cannot create the output folder X (File exists)" of a file X
    if args.masks is not None and args.images is None:
        raise SalienceError("--masks needs its images: give --images DIR too (a mask per image, same file names)")
    steps = args.deletion_steps if args.deletion_steps is not None else DELETION_STEPS
    for opt, value in (("n", args.n), ("deletion_steps", steps), ("randomization_images", args.randomization_images)):
        check_int(value, f"--{opt.replace('_', '-')}", minimum=1)
    methods = parse_methods(args.method) if args.method else None
    given = _options.given_options(args)
    if methods is not None:
        _check_applicable(methods, given)
    if args.data_randomization and (not args.model.startswith("demo:shapes") or args.model == "demo:shapes-regression"):
        raise SalienceError("--data-randomization retrains the demo recipe, so it needs a demo:shapes classifier")
    model = load_model_arg(args)
    methods, options = _method_options(args, model, methods, given)
    if "steps" in given and args.deletion_steps is None:
        warn(f"warning: {STEPS_NOTE}")
    kwargs: dict[str, Any] = {"n": args.n, "steps": steps, "randomization_images": args.randomization_images,
                              "progress": sys.stderr.isatty(), "probability": args.probability,
                              "method_options": options, "skip_unreadable": args.skip_unreadable}
    if args.images is not None:
        kwargs["images"] = args.images
    if args.masks is not None:
        kwargs["masks"] = args.masks
    if methods is not None:
        kwargs["methods"] = methods
    if args.data_randomization:
        kwargs.update(train_fn=demo_train_fn(epochs=6), train_images=2000)
    if isinstance(model, torch.jit.ScriptModule):
        warn(f"no randomization columns: {NO_HOOKS}")
    with flag_errors(FLAGS, args):
        report = evaluate.run_evaluation(model, args.out, **kwargs)
    print(f"evaluation written to {args.out}")
    print(f"report: {Path(report).resolve()}")
    results = json.loads((Path(report).parent / "results.json").read_text())
    for left_out in results.get("skipped", []):  # --skip-unreadable: each image left out, with why
        path, why = left_out["image"], left_out["error"]
        warn(f"skipped {why if why.startswith(path) else f'{path}: {why}'}")
    for text in results.get("warnings", []):  # flat maps (method, oracle, baseline): numbers of nothing
        warn(f"warning: {text}")
    rows = results["rows"]
    failed = [(r["name"], r["error"]) for r in rows if r.get("error")]
    for name, message in failed:  # in the report's table too; said here as explain says it
        warn(f"method {name} failed: {message.removeprefix('SalienceError: ')}")
    return EXIT_PARTIAL if failed or results.get("skipped") else EXIT_OK
