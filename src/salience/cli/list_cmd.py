"""``salience list``: the methods, targets, reductions, grad modifiers and models available."""
from __future__ import annotations

import argparse
from typing import Any

from salience.cli.common import EXIT_OK
from salience.demo import zoo
from salience.methods import METHODS
from salience.reduce import GRAD_MODIFIERS, REDUCTIONS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="list the methods, targets, models and options available")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the registries' names (and each method's first doc line) and the model specs."""
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
