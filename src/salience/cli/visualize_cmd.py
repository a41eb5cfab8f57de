"""``salience visualize``: the image a model finds most typical of a class (class model visualization)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salience._core.autograd import model_input
from salience._core.errors import SalienceError
from salience._core.files import make_folder
from salience._core.info import model_info
from salience._core.tensors import check_int
from salience.cli.common import (EXIT_OK, add_model_args, check_no_file_in_way, flag_errors, load_model_arg, parse_class,
                                 path_kind, scores,
                                 to_image, warn)
from salience.cli.inputs import check_side, check_size_bounds, check_static_input
from salience.loading import unnormalize
from salience.methods.class_model import class_model
from salience.render import viz


def add_parser(sub: Any) -> None:
    p = sub.add_parser("visualize", help="the image a model finds most typical of a class (class model)")
    add_model_args(p)
    p.add_argument("--target", required=True, metavar="CLASS", help="class index or name")
    p.add_argument("--out", "-o", default="class.png", metavar="PNG")
    p.add_argument("--steps", type=int, default=None, help="optimization steps")
    p.add_argument("--size", type=int, default=224, help="image side when the model does not say (default 224)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="the model's input channels, as explain's --channels: replaces what the model says (a "
                        "python: or .pt2 model with a one-channel stem; default: the model's, else 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Optimize the class model image of ``args.target`` and write it as a PNG to ``args.out``."""
    if Path(args.out).suffix.lower() != ".png":
        raise SalienceError(f"--out {args.out}: visualize writes a PNG image; give a file name ending in .png")
    check_side(args.size, "--size")
    if args.steps is not None:  # class_model said "steps must be ...", without the flag, once the model had loaded
        check_int(args.steps, "--steps", minimum=1)
    out = Path(args.out)
    check_no_file_in_way(args.out, names_file=True)  # mkdir said "cannot create the output folder X (File exists)"
    if path_kind(out, "--out", args.out) == "folder":  # said before the optimization, not after it
        raise SalienceError(f"--out {out}: a folder of that name exists; give a file name ending in .png")
    model = load_model_arg(args)  # a device that is not there refused before anything is written
    make_folder(out.parent)
    info = model_info(model)
    if args.channels is not None:  # the hint of the input error of a gray model ("--channels 1")
        info = dataclasses.replace(info, channels=args.channels)
        check_static_input(model_info(model), info, f"--channels {args.channels}")  # a .pt2 program's fixed ones
    h, w = info.input_size or (args.size, args.size)
    if info.input_size is None:  # a .pt2 program's Dim(min=, max=): was torch's guard error, exit 3
        check_size_bounds(info, dataclasses.replace(info, input_size=(h, w)), f"--size {args.size}")
    k = scores(model, model_input(model, torch.zeros(1, info.channels, h, w))).shape[1]
    target = parse_class(args.target, info, k)
    kwargs: dict[str, Any] = {"shape": (info.channels, h, w), "progress": sys.stderr.isatty()}
    if args.steps is not None:
        kwargs["steps"] = args.steps  # checked by class_model
    with flag_errors({"steps=": "--steps"}, args):  # the cap on its passes names the keyword
        img = class_model(model, target, **kwargs).detach().cpu()
    note = viz.constant_map_note(img[0], what="class model image")  # the score gave it no gradient: still its start
    if note is not None:
        warn(f"warning: {args.out}: {note}")
    pic = to_image(unnormalize(img[0], info)) if info.mean is not None else to_image(img[0].clamp(0, 1))
    arr = (pic.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    viz.save_png(out, arr)
    print(f"class model of {info.class_name(target)} ({target}): {out}")
    return EXIT_OK
