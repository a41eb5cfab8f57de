"""The ``salience`` command.

Commands, a module each: ``explain`` (saliency maps of image files), ``demo`` (an HTML report on
the bundled demo models), ``list``, ``visualize`` (class model images), ``evaluate`` (metrics) and
``explore`` (a local web page); :mod:`salience.cli.common` holds what they share.

Command-line strings reach functions only through the library's registries, never a table of
the CLI's own: method names through :data:`salience.methods.METHODS` (as the metrics and
evaluation do), the reductions and gradient modifiers that ``list`` names through
:data:`salience.reduce.REDUCTIONS` and :data:`salience.reduce.GRAD_MODIFIERS`; ``--mode`` and
``--unsupported`` are handed to :func:`salience.targets.regression` and the methods as given
(``--unsupported``'s choices are :data:`salience.rules.UNSUPPORTED`).

Exit codes: 0 success; 1 some inputs failed (the others' results are written); 2 bad
arguments, model, method or target (nothing explained); 3 an unexpected internal error (set
``SALIENCE_DEBUG=1`` for its traceback); 130 interrupted. Every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Optional, Sequence

import torch

from salience import __version__
from salience._core.errors import SalienceError
from salience.cli import demo_cmd, evaluate_cmd, explain_cmd, explore_cmd, list_cmd, visualize_cmd
from salience.cli.common import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, Parser, error,
                                 output_flag_said, performance_from_args,
                                 parse_class, parse_methods)
from salience.cli.demo_cmd import DEMO_SEED

__all__ = ["main", "build_parser", "parse_methods", "parse_class", "DEMO_SEED",
           "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED"]

_COMMANDS = (explain_cmd, demo_cmd, list_cmd, visualize_cmd, evaluate_cmd, explore_cmd)
"""The command modules, in the order of the help: each has ``add_parser(subparsers)`` and ``run(args)``."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each subcommand's ``func`` default is the function that runs it."""
    parser = Parser(
        prog="salience",
        description="Saliency maps for PyTorch image models: which pixels made the model decide.",
        epilog="Exit codes: 0 ok, 1 some inputs failed (others written), 2 nothing explained (bad arguments/model/"
               "method/target, or no input readable), 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"salience {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None, *, owns_process: Optional[bool] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code. ``owns_process``
    (default: ``argv is None``, as the ``salience`` command and ``python -m salience`` call it): the process
    ends with the command, so ``explain`` and ``evaluate`` run with ``allocator="reuse"`` unless
    ``--allocator`` says otherwise or the environment sets glibc's thresholds
    (:data:`salience.cli.common.OWN_PROCESS_ALLOCATOR`)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or argparse's own usage error
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    plain_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # printed warnings only; recorded ones (tests) are untouched
    try:
        with performance_from_args(args, owns_process=argv is None if owns_process is None else owns_process):
            return int(args.func(args))
    except SalienceError as e:
        error(output_flag_said(str(e), args))
        return EXIT_USAGE
    except MemoryError:
        error(_OUT_OF_MEMORY)
        return EXIT_USAGE
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into head
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen model: one line, traceback on request
        if os.environ.get("SALIENCE_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        if _out_of_memory(e):  # torch's allocators raise RuntimeErrors, not MemoryError
            error(f"{_OUT_OF_MEMORY} (torch: {first})")
            return EXIT_USAGE
        error(f"unexpected {type(e).__name__}: {first} (set SALIENCE_DEBUG=1 to see the traceback, and "
              "please report it)")
        return EXIT_INTERNAL
    finally:
        warnings.formatwarning = plain_format


_OUT_OF_MEMORY = ("out of memory; use fewer or smaller images per pass (--batch, --max-pixels, a smaller --size), "
                  "or --max-memory / --chunk for the many-pass methods")


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch running out of memory: ``torch.OutOfMemoryError`` (CUDA, MPS) or the CPU
    allocator's RuntimeError (``DefaultCPUAllocator: can't allocate memory``)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: Optional[str] = None) -> str:
    """A warning as the command prints it: ``salience: warning: MESSAGE`` (the category named unless
    it is a plain ``UserWarning``), without Python's file, line number and source line."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"salience: warning: {kind}{message}\n"
