"""``salience explore``: a local web page to compare methods, targets and models on your images."""
from __future__ import annotations

import argparse
import os
import sys
import webbrowser
from pathlib import Path
from typing import Any, Optional, Sequence

from salience._core.errors import SalienceError
from salience._core.tensors import check_int
from salience.cli.common import (EXIT_INTERRUPTED, EXIT_OK, MODEL_FLAGS, RUN_FLAGS, add_model_args, error,
                                 flag_errors, model_specs_help, output_arg, warn, with_flags)
from salience.loading import DEFAULT_MAX_PIXELS, load_image


def add_parser(sub: Any) -> None:
    p = sub.add_parser("explore", help="a local web page: compare methods, classes and models on your images",
                       description="Start the explorer on 127.0.0.1 and a free port and print its URL: drop an "
                                   "image, click classes, add methods, change settings, compare models.",
                       epilog="models (--model, --compare):\n" + model_specs_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or folders to pick from (only these and uploads are ever served); a run "
                        "folder (salience explain DIR --out RUN) adds its gallery of rows")
    add_model_args(p)
    p.add_argument("--compare", metavar="MODEL", action="append", default=None,
                   help="another model shown side by side (same loading options); repeat it to compare "
                        "several: --compare A --compare B")
    p.add_argument("--compare-weights", metavar="FILE", action="append", default=None,
                   help="the --weights of the --compare model, when not the same as --model's ('random' for "
                        "random weights, e.g. to compare a trained model with its untrained self); given once it "
                        "applies to every --compare model, or repeat it once per --compare, in the same order")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other lets anyone who reaches the port "
                        "run the model, and prints a warning)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free port)")
    p.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                   help="also answer requests for this host name (repeatable; '*' for any): the page answers "
                        "only localhost names and its own origin (a guard against DNS rebinding and other "
                        "sites), so a proxy in front of it (JupyterHub, Colab, a reverse proxy) needs its name")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images over N pixels before decoding (default {DEFAULT_MAX_PIXELS:,})")
    p.set_defaults(func=run)


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"weights": args.weights, "trust_pickle": args.trust_pickle, "device": args.device,
            "output": output_arg(args)}


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    from salience.explore.server import start

    check_int(args.max_pixels, "--max-pixels", minimum=1)  # 0 or less refused every image (as explain's)
    weights = args.compare_weights or []
    if weights and not args.compare:
        raise SalienceError("--compare-weights is the weights of the --compare model: give --compare MODEL too")
    if len(weights) > 1 and len(weights) != len(args.compare):
        raise SalienceError(f"--compare-weights given {len(weights)} times for {len(args.compare)} --compare models: "
                            "give it once (for all of them) or once per --compare, in the same order")
    images = shown_inputs(args.images, args.max_pixels)
    with flag_errors({**MODEL_FLAGS, **RUN_FLAGS}, args):  # the models' loading errors (load_model's keywords), a
        # run's refusal (a run.json damaged since it was looked at: start it again with --overwrite) said with the flags
        explorer = start(args.model, images, compare=args.compare, host=args.host, port=args.port,
                         max_pixels=args.max_pixels, load=_load_options(args), background=False,
                         compare_load=None if not weights else [{"weights": w} for w in weights]
                         if len(weights) > 1 else {"weights": weights[0]},
                         allow_hosts=args.allow_host)
    print(f"salience explore: {explorer.url}  (Ctrl-C stops it)", flush=True)
    if args.open:
        webbrowser.open(explorer.url)
    try:
        explorer.serve_forever()
    except KeyboardInterrupt:
        if explorer.hub.computing():
            # a worker is still inside a forward pass (it stops at the next one): Python's exit around a
            # thread in torch's C++ code crashed the process (SIGSEGV / SIGABRT); the uploads are removed
            # by now, so the process ends at once with the interruption's status
            error("interrupted")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        raise
    return EXIT_OK


def shown_inputs(inputs: Sequence[str], max_pixels: int) -> list[str]:
    """The ``inputs`` the page can show, in order; each one left out is said on stderr, a line each (the input and
    why), before the model loads: the page started without a word of them (the lead's decision, session 54). An
    image file named is read as the page would read it (:func:`salience.loading.load_image`, once); a folder is
    left out when it holds no image file or none the page can read (checked up to the first readable one, cheaply:
    :func:`_unreadable_folder`; a folder may hold thousands); a run folder is kept (one without its ``run.json`` yet
    left out). A :class:`SalienceError` (exit 2) when inputs were named and none is left."""
    kept = []
    for given in inputs:
        why = _left_out(given, max_pixels)
        if why is None:
            kept.append(given)
        else:
            warn(f"left out {why if why.startswith(given) else f'{given}: {why}'}")
    if inputs and not kept:
        raise SalienceError(f"none of the {len(inputs)} input(s) can be shown (each said above); give image files, "
                            "folders of them or a run folder")
    return kept


def _left_out(given: str, max_pixels: int) -> Optional[str]:
    """Why the page cannot show the input ``given`` (a file's own error names it first), or ``None``."""
    from salience.explore.runs import is_run

    path = Path(given)
    if is_run(path):
        if not (path / "run.json").is_file():  # its lock or tables only: no rows to show (RunSource needs run.json)
            return _begun_run(path)
        return _unreadable_run(path, given)
    if path.is_dir():
        return _unreadable_folder(path, max_pixels)
    if not path.exists():
        return "no such file or folder; check the path"
    try:
        load_image(path, max_pixels=max_pixels)
    except SalienceError as e:
        return str(e)
    return None


def _unreadable_run(folder: Path, given: str) -> Optional[str]:
    """Why the page cannot show the run ``folder`` (given as ``given``) whose ``run.json`` is there, or ``None``: its
    manifest damaged or unreadable (:func:`salience.runs.store.read_manifest`: a key missing, a method that is no
    folder's name, ...), said with the flag that starts it again (``--overwrite``, :data:`RUN_FLAGS`), not the
    Python keyword. Only the manifest is read (:func:`salience.open_run` reads the rows when asked)."""
    from salience.runs.store import open_run

    try:
        open_run(folder)
    except SalienceError as e:
        return with_flags(str(e), RUN_FLAGS, [given, str(folder)])
    return None


def _begun_run(folder: Path) -> str:
    """Why the page cannot show the run folder ``folder`` without its ``run.json``
    (:func:`salience.runs.store.unwritten_run`: a run starting, or stopped before it wrote it), in the words
    :func:`salience.open_run` and :func:`salience.explore` raise."""
    from salience.runs.store import unwritten_run

    return unwritten_run(folder)


def _unreadable_folder(folder: Path, max_pixels: int) -> Optional[str]:
    """Why the page cannot show the folder ``folder``: no image file in it, or none of them readable (the first
    one's error in the page's order said), or ``None``. Its images are checked in the folder's own order up to the
    first readable one, each opened once (:func:`salience.explore.images.unreadable`: its header, a PNG's chunks
    verified, any other format decoded by Pillow, a JPEG at 1/8 of its size), the folder read only that far
    (:func:`salience.explore.images.image_files`): a folder of thousands of sound images costs one file's check, not
    a listing of all of it."""
    from salience.explore.images import IMAGE_SUFFIXES, image_files, unreadable

    failed: dict[str, str] = {}
    for f in image_files(folder):
        why = unreadable(f, max_pixels)
        if why is None:
            return None
        failed[f.name] = why
    if not failed:
        return f"a folder without image files ({', '.join(IMAGE_SUFFIXES)})"
    return f"none of its {len(failed)} image file(s) can be read; the first: {failed[min(failed)]}"
