"""``salience evaluate``: saliency metrics (pointing game, deletion, randomization, Clever Hans) as a report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from salience._core.errors import SalienceError
from salience._core.tensors import check_int
from salience.cli.common import EXIT_OK, EXIT_PARTIAL, add_model_args, load_model_arg, parse_methods, warn
from salience.demo.train import demo_train_fn
from salience.evidence import evaluate
from salience.evidence.sanity import NO_HOOKS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="saliency metrics (pointing game, deletion, Clever Hans check)")
    add_model_args(p)
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
    p.add_argument("--probability", choices=("softmax", "sigmoid"), default="softmax",
                   help="how deletion, insertion and ROAD score the class: softmax over the classes (default), or "
                        "each class's own sigmoid (a multilabel model)")
    p.add_argument("--out", "-o", default="salience-eval", metavar="DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate the methods on the model; the report, tables and figures go to ``args.out``."""
    if args.masks is not None and args.images is None:
        raise SalienceError("--masks needs its images: give --images DIR too (a mask per image, same file names)")
    for opt in ("n", "steps", "randomization_images"):
        check_int(getattr(args, opt), f"--{opt.replace('_', '-')}", minimum=1)
    model = load_model_arg(args)
    kwargs: dict[str, Any] = {"n": args.n, "steps": args.steps, "randomization_images": args.randomization_images,
                              "progress": sys.stderr.isatty(), "probability": args.probability}
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
    if isinstance(model, torch.jit.ScriptModule):
        warn(f"no randomization columns: {NO_HOOKS}")
    report = evaluate.run_evaluation(model, args.out, **kwargs)
    print(f"evaluation written to {args.out}")
    print(f"report: {Path(report).resolve()}")
    results = json.loads((Path(report).parent / "results.json").read_text())
    for text in results.get("warnings", []):  # flat maps (method, oracle, baseline): numbers of nothing
        warn(f"warning: {text}")
    rows = results["rows"]
    failed = [(r["name"], r["error"]) for r in rows if r.get("error")]
    for name, message in failed:  # in the report's table too; said here as explain says it
        warn(f"method {name} failed: {message.removeprefix('SalienceError: ')}")
    return EXIT_PARTIAL if failed else EXIT_OK
