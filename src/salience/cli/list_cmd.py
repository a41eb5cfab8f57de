"""``salience list [METHOD]``: the methods, targets, reductions, grad modifiers and models available,
or one method's options."""
from __future__ import annotations

import argparse
from typing import Any

from salience.cli.common import EXIT_OK, model_specs_help
from salience.cli.options import describe
from salience.demo import zoo
from salience.methods import METHODS
from salience.reduce import GRAD_MODIFIERS, REDUCTIONS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="list the methods, targets, models and options available",
                       description="Without METHOD: every method, target, reduction, grad modifier and model "
                                   "spec. With METHOD: its options, their defaults and flags.")
    p.add_argument("method", nargs="?", metavar="METHOD", help="a method whose options to list (e.g. gradcam)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one method's options, or the registries' names (and each method's first doc line) and the model specs."""
    if args.method:
        print("\n".join(describe(args.method)))
        return EXIT_OK
    print("methods:")
    for name, fn in METHODS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0].replace("``", "") if fn.__doc__ else ""
        print(f"  {name:<20} {doc}")
    print("  (salience list METHOD: its options)")
    print("targets: predicted (default), --target CLASS (index or name), --top K; regression models: "
          "--target OUTPUT --mode increase|decrease|maintain")
    print("reductions:", ", ".join(REDUCTIONS))
    print("grad modifiers:", ", ".join(GRAD_MODIFIERS))
    print("models:")
    for name, desc in zoo.DEMOS.items():
        print(f"  demo:{name:<18} {desc}")
    print("model specs (--model):")
    print(model_specs_help())
    return EXIT_OK
