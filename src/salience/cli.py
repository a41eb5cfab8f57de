"""The ``salience`` command: the only place that maps strings to functions."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .methods import METHODS
from .reduce import GRAD_MODIFIERS, REDUCTIONS


def _cmd_list(args: argparse.Namespace) -> int:
    print("methods:")
    for name, fn in METHODS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        print(f"  {name:<20} {doc}")
    print("targets: predicted (default), CLASS index, --top K, multilabel, regression, activation LAYER:CHANNEL")
    print("reductions:", ", ".join(REDUCTIONS))
    print("grad modifiers:", ", ".join(GRAD_MODIFIERS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salience",
        description="Saliency maps for PyTorch image models: which pixels made the model decide.",
    )
    parser.add_argument("--version", action="version", version=f"salience {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_list = sub.add_parser("list", help="list the methods, targets and options available")
    p_list.set_defaults(func=_cmd_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
