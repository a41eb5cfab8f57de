"""``salience list [METHOD] [--model MODEL]``: the methods, targets, reductions, grad modifiers and models
available, one method's options, or what salience picks for a model (Grad-CAM layer, methods)."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from salience._core.errors import SalienceError
from salience._core.info import model_info
from salience._core.tensors import model_device
from salience.cli.common import EXIT_OK, load_model_arg, model_specs_help, scores
from salience.cli.inputs import check_side
from salience.cli.options import describe
from salience.demo import zoo
from salience.methods import LAYER_METHODS, METHODS, default_methods
from salience.methods.gradcam import describe_default_layer
from salience.reduce import GRAD_MODIFIERS, REDUCTIONS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="list the methods, targets, models and options available",
                       description="Without METHOD: every method, target, reduction, grad modifier and model "
                                   "spec. With METHOD: its options, their defaults and flags.")
    p.add_argument("method", nargs="?", metavar="METHOD", help="a method whose options to list (e.g. gradcam)")
    p.add_argument("--model", "-m", default=None, metavar="MODEL",
                   help="also say what salience picks for this model (as in explain): the Grad-CAM layer, the "
                        "methods that apply")
    p.add_argument("--weights", metavar="FILE", help="as in explain")
    p.add_argument("--output", metavar="KEY|INDEX", default=None, help="as in explain")
    p.add_argument("--trust-pickle", action="store_true", help="as in explain")
    p.add_argument("--device", default=None, help="as in explain")
    p.add_argument("--size", type=int, default=224, help="image side when the model does not say (default 224)")
    p.set_defaults(func=run)


def describe_model(args: argparse.Namespace) -> list[str]:
    """What salience picks for ``args.model`` on an image of its input size: the default Grad-CAM
    layer with its layout and why, and the methods that apply (``default_methods``); where the default layer
    is refused (CrossViT), the layer methods that run when ``--layer`` names one."""
    check_side(args.size, "--size")
    model = load_model_arg(args)
    info = model_info(model)
    h, w = info.input_size or (args.size, args.size)
    x = torch.rand(1, info.channels, h, w, device=model_device(model))
    if args.output is not None:  # nothing here reads the scores: a wrong --output was taken silently (exit 0)
        scores(model, x)
    try:
        layer = f"(default; --layer to change): {describe_default_layer(model, x)}"
    except SalienceError as e:  # e.g. a TorchScript file, which explain still runs the gradient methods on
        layer = f"none ({e})"
    methods = default_methods(model, x)
    named = [n for n in METHODS if n in LAYER_METHODS and n not in methods]
    script = isinstance(model, torch.jit.ScriptModule)
    with_layer = f"; with --layer also: {', '.join(named)}" if named and not script else ""
    return [f"model {args.model} ({info.channels} x {h} x {w} input):",
            f"  Grad-CAM layer {layer}",
            f"  methods that apply (run when none is named): {', '.join(methods)}{with_layer}"]


def run(args: argparse.Namespace) -> int:
    """Print one method's options, or the registries' names (and each method's first doc line) and the model specs."""
    if args.method:
        print("\n".join(describe(args.method)))
    if args.model:
        print("\n".join(describe_model(args)))
    if args.method or args.model:
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
