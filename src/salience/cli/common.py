"""What several commands share: exit codes, messages, argument parsing, the model's scores, files."""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
from pathlib import Path
import contextlib
from typing import Any, ContextManager, Iterator, Mapping, Optional, Sequence

import numpy as np
from torch import Tensor, nn

from salience._core.args import FullFlags
from salience._core.autograd import forward_scores, class_probabilities
from salience._core.errors import SalienceError, suggest
from salience._core.files import make_folder
from salience._core.perf import ALLOCATORS, FREEZE, MEMORY_FORMATS, PRECISIONS, performance
from salience._core.malloc import available as malloc_available, user_tuned as malloc_user_tuned
from salience.loading import load_model
from salience.loading.models import MODEL_SPECS
from salience.loading.remote import is_remote
from salience.methods import METHODS
from salience.render import viz

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def error(msg: str) -> None:
    """The one-line error of a failed command, on stderr."""
    print(f"salience: error: {msg}", file=sys.stderr)


def warn(msg: str) -> None:
    """A one-line note on stderr (a skipped input, a failed method)."""
    print(f"salience: {msg}", file=sys.stderr)


METHOD_FLAGS = {"unsupported='warn' (or 'ignore')": "--unsupported warn (or ignore)",
                "unsupported='ignore'": "--unsupported ignore", "use salience.vanilla": "use --method vanilla"}
"""What the guided methods' refusals (an activation the rule is not defined for, a model without ReLUs) name
of the Python API, as the commands' flags (``salience explain``, dataset runs, ``evaluate``)."""


def with_flags(message: str, flags: Mapping[str, str], given: Sequence[str] = ()) -> str:
    """``message``, an error of the Python API that names its keywords (``masks=DIR``, ``labels=``,
    ``overwrite=True``), as the command says it: each ``flags`` key (the keyword with its ``=``, or a
    whole ``keyword=value``) as its flag (``--masks DIR``, ``--labels-csv``, ``--overwrite``). Only a
    keyword that starts a word (after a space or an opening bracket) is one: a word that only ends in
    one (``layout=``, ``/data/masks=v2``, a path the user gave, ``--out=``) or a quoted value
    (``'target=3'``, a CSV cell) is left as it is; so is each of ``given`` (what the user typed) that holds
    a keyword, wherever the message repeats it (a file ``weights=x.pt``, a folder ``out=run``, at a word's start
    too), unless it is a keyword alone (``out=``: which one the message means cannot be told). A key that ends in a
    letter or digit (a bare keyword, ``top``; ``overwrite=True``) is one only as a whole word: not the start of a
    longer one (``topology``, ``model`` for ``mode``, ``top-level``)."""
    kept = sorted({v for v in given if v not in flags and any(k in v for k in flags)}, key=len, reverse=True)
    for i, v in enumerate(kept):
        message = message.replace(v, f"\0{i}\0")
    for word, flag in flags.items():
        def said(m: re.Match) -> str:
            value = m.group(1)
            return flag + (" " if value and value not in ",;:)]}'\"" else "")
        end = r"(?![\w=-])" if word[-1:].isalnum() else ""
        message = re.sub(rf"(?<![^\s(\[]){re.escape(word)}{end}(?=(\S?))", said, message)
    for i, v in enumerate(kept):
        message = message.replace(f"\0{i}\0", v)
    return message


def _warned_by_salience(frame: Any) -> bool:
    """Whether the warning being formatted (``frame``: in the warnings module, which formats it) was
    issued by salience's code, whose warnings name its keywords; not by the user's model or dataset,
    or a library, whose ``target=`` or ``masks=`` are their own words."""
    while frame is not None and frame.f_globals.get("__name__") in ("warnings", "_py_warnings"):
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name == "salience" or name.startswith("salience.")


@contextlib.contextmanager
def flag_errors(flags: Mapping[str, str], args: Optional[argparse.Namespace] = None) -> Iterator[None]:
    """A :class:`SalienceError` of the Python API raised inside, and the warnings salience prints (not
    those of the user's model or dataset), said with the command's flags (:func:`with_flags`); the
    values the user gave in ``args`` (a path ``weights=x.pt``, a folder ``out=run``) are left as they are."""
    import warnings

    shown = warnings.formatwarning
    given = _given(args)

    def flagged(message: Any, *args: Any, **kwargs: Any) -> str:
        said = with_flags(str(message), flags, given) if _warned_by_salience(sys._getframe(1)) else message
        return shown(said, *args, **kwargs)

    warnings.formatwarning = flagged
    try:
        yield
    except SalienceError as e:
        raise SalienceError(with_flags(str(e), flags, given)) from None
    finally:
        warnings.formatwarning = shown


def _given(args: Optional[argparse.Namespace]) -> list[str]:
    """The text values of ``args`` (lists' items too), each also as a path writes it (``./x`` as ``x``)."""
    values: list[str] = []
    for v in vars(args).values() if args is not None else ():
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(item, str) and item:
                values += [item, str(Path(item))]
    return values


# --------------------------------------------------------------------------------- arguments


def many_pass_methods() -> list[str]:
    """The methods of :data:`salience.methods.METHODS` that take the performance keywords (``memory_format=``,
    ``compile=``, ``precision=``: the many-pass methods), by their names: the title of the commands' performance
    flags names them (it wrote ``integrated-gradients``, no method's name, until session 55)."""
    from salience._core.engine import signature_of

    return [name for name, fn in METHODS.items() if "memory_format" in signature_of(fn).parameters]


class Parser(FullFlags):
    """The commands' parser: ``--compile`` alone is ``compile=True``, ``--compile freeze`` (or
    ``--compile=freeze``) ``compile="freeze"`` (:func:`compile_words`). Flags are written in full: no
    abbreviations, and an unknown flag's refusal names the closest (:class:`salience._core.args.FullFlags`; the
    subcommands' parsers too, as they are of this class; ``--sample 3`` was taken as ``--samples 3``). A flag's value
    that starts with ``-`` and a digit (``--max-memory -5GB``) is its value (``FullFlags.negative_values``), not
    argparse's "expected one argument"."""

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:
        return super().parse_known_args(compile_words(sys.argv[1:] if args is None else args), namespace)


def compile_words(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--compile`` in the one form argparse reads without taking a following image
    path as its value: ``--compile freeze`` becomes ``--compile=freeze``, a bare ``--compile`` (the
    switch it always was: ``--compile a.png``) ``--compile=true``. Nothing after ``--`` is touched."""
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--":
            out += words[i:]
            break
        if w == "--compile":  # written in full: the parsers take no abbreviations (Parser)
            if i + 1 < len(words) and words[i + 1] == FREEZE:
                out.append(f"--compile={FREEZE}")
                i += 2
                continue
            w = "--compile=true"
        out.append(w)
        i += 1
    return out


def _compile_value(text: str) -> Any:
    """``--compile``'s value (after :func:`compile_words`): ``True`` or ``"freeze"``."""
    if text == "true":
        return True
    if text == FREEZE:
        return FREEZE
    raise argparse.ArgumentTypeError(f"--compile takes no value (torch.compile) or {FREEZE!r} (frozen graphs for "
                                     f"the passes without gradients); got {text!r}")


def parse_methods(values: Optional[Sequence[str]]) -> list[str]:
    """``["vanilla,gradcam", "smoothgrad"]`` -> known method names, in order, without repeats."""
    names: list[str] = []
    for v in values or ["vanilla"]:
        for name in v.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise SalienceError("--method got no method name; e.g. --method vanilla")
    for name in names:
        if name not in METHODS:
            raise SalienceError(
                f"unknown method {name!r}{suggest(name, list(METHODS))} (available: {', '.join(METHODS)})"
            )
    return names


def parse_class(value: str, info: Any, num_outputs: int) -> int:
    """A class given as an index or a name (case-insensitive) -> its index, checked against the model. A name that
    several classes share when case is ignored is the one class it names exactly (``Cardigan`` of ImageNet: the corgi,
    264; ``cardigan``: the sweater, 474), else refused, naming their indices."""
    names = list(info.class_names or ())
    v = value.strip()
    if re.fullmatch(r"-?\d+", v):
        idx = int(v)
    else:
        lowered = [n.lower() for n in names]
        if v.lower() not in lowered:
            known = f" (classes: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else \
                " (the model has no class names; give an index)"
            raise SalienceError(f"unknown target class {v!r}{suggest(v, names)}{known}")
        hits = [i for i, n in enumerate(lowered) if n == v.lower()]
        exact = [i for i in hits if names[i] == v]
        if len(hits) > 1 and len(exact) == 1:  # the name as written, case and all, is one class's
            hits = exact
        if len(hits) > 1:  # the first was taken silently (ImageNet's 'cardigan': the corgi 264 and the sweater 474)
            raise SalienceError(f"target class {v!r} names {len(hits)} classes: "
                                f"{', '.join(f'{i} ({names[i]})' for i in hits)}; give the index of the one you mean")
        idx = hits[0]
    if not 0 <= idx < num_outputs:
        labels = f": {', '.join(names)}" if names and len(names) <= 10 else ""
        raise SalienceError(
            f"target class {idx} is out of range for {info.name} with {outputs(num_outputs)} "
            f"(valid: 0..{num_outputs - 1}{labels})"
        )
    return idx


def outputs(n: int) -> str:
    """``"1 output"``, ``"5 outputs"``: a model's number of outputs in words (it said "with 1 outputs")."""
    return f"{n} output{'' if n == 1 else 's'}"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and the options of loading it (explain, visualize, evaluate)."""
    p.add_argument("--model", "-m", required=True, metavar="MODEL",
                   help="; ".join(f"{spec}: {desc}" for spec, desc in MODEL_SPECS).replace("%", "%%"))
    p.add_argument("--weights", metavar="FILE",
                   help="state dict (.pt/.pth/.safetensors) for torchvision:ARCH, timm:NAME or python:MODULE:FUNC "
                        "('random' for random weights; default: pretrained)")
    p.add_argument("--output", metavar="KEY|INDEX", default=None,
                   help="which part of what the model returns holds the scores: a dict key or a tuple index "
                        "(default: a tensor as it is, .logits, a dict's 'logits' or only tensor, a tuple's first)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling the model file (can run arbitrary code: only for files you trust)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (cuda when there is one; default: cpu)")
    g = p.add_argument_group(f"performance (many-pass methods: {', '.join(many_pass_methods())}; dataset runs; "
                             "docs/performance.md)")
    g.add_argument("--memory-format", choices=MEMORY_FORMATS, default=None,
                   help="contiguous (default), channels_last, or auto: channels-last for a convolutional model "
                        "where a short probe shows it is faster")
    g.add_argument("--compile", nargs="?", const=True, default=None, type=_compile_value, metavar="freeze",
                   help="run the passes through torch.compile (inductor); the first compile takes long, so "
                        "for long jobs; falls back to eager with a warning where unavailable. '--compile freeze': "
                        "the passes without gradients (scorecam, occlusion, rise) run a graph compiled with "
                        "inductor's freezing (the weights as constants; compiled again when they change)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (default), or bf16 / fp16 autocast for the forward pass: for CUDA, and bf16 for a "
                        "CPU with AMX-BF16 (with --memory-format channels_last about 0.4x fp32's time on resnet50); "
                        "no faster than fp32 with AVX512-BF16 alone, slower without bf16 (a warning says so); the "
                        "pixel-gradient maps differ from fp32's by 0.1-0.6 in relative L2, the CAMs' by about 0.01 "
                        "(docs/performance.md); bf16-mixed: bf16 with the operations on the maps at a quarter of "
                        "the input's resolution or larger in fp32 (vanilla's map of a pretrained EfficientNet-Lite0: "
                        "correlation 0.97 with fp32's against bf16's 0.68-0.82; resnet50 0.64x fp32's time; no "
                        "--compile); part of a dataset run's command")
    g.add_argument("--fold-batchnorm", action="store_true", default=None,
                   help="plain passes run a copy of the model with each BatchNorm folded into the convolution "
                        "before it (the same function: maps equal up to float rounding; faster on CNNs)")
    g.add_argument("--allocator", choices=ALLOCATORS, default=None,
                   help="reuse: on a CPU with glibc, malloc's mmap and trim thresholds fixed high before the "
                        "first pass, so the memory a pass frees is kept for the next (fewer page faults: about half for "
                        "explain DIR, measured; the process keeps its peak memory); the default of explain and evaluate run as the "
                        "salience command (unless the environment sets glibc's thresholds: MALLOC_MMAP_THRESHOLD_, "
                        "MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_, GLIBC_TUNABLES). default: glibc's "
                        "thresholds left adjusting, the mmap threshold raised once before the first CPU pass (not where "
                        "the environment sets them; the other commands' default). system: the C allocator exactly as "
                        "the process has it, nothing done")


OWN_PROCESS_ALLOCATOR = {"explain": "reuse", "evaluate": "reuse"}
"""The allocator of these commands when the command owns its process (the ``salience`` command, ``python -m
salience``), no ``--allocator`` says otherwise and the C library is glibc (elsewhere the option does nothing and
would warn): their CPU passes fault far fewer pages afresh (about half a dataset command's: docs/performance.md,
session 39); the setting is process-wide and not undone, which a process that ends with the command can afford, and
:func:`salience.cli.main` called with an ``argv`` from a user's process (a notebook, a test) cannot. Not where the
process started with glibc's own threshold settings in its environment (``MALLOC_MMAP_THRESHOLD_`` and the like:
:func:`salience._core.malloc.user_tuned`): the user's settings are heeded, and the command runs under the library's
default (which then does nothing to the allocator either)."""


def performance_from_args(args: argparse.Namespace, owns_process: bool = False) -> ContextManager[Any]:
    """The performance options a command's flags give, in force for the command (this thread); with
    ``owns_process``, :data:`OWN_PROCESS_ALLOCATOR`'s allocator where ``--allocator`` is not given (on glibc, in a
    process whose environment sets none of glibc's thresholds)."""
    allocator = getattr(args, "allocator", None)
    # elsewhere than glibc: not a default to warn of; the user's own thresholds: not a default to override them with
    if allocator is None and owns_process and malloc_available() and malloc_user_tuned() is None:
        allocator = OWN_PROCESS_ALLOCATOR.get(getattr(args, "command", None) or "")
    return performance(memory_format=getattr(args, "memory_format", None), compile=getattr(args, "compile", None),
                       precision=getattr(args, "precision", None),
                       fold_batchnorm=getattr(args, "fold_batchnorm", None), allocator=allocator)


def model_specs_help(indent: str = "  ") -> str:
    """The model specs (:data:`salience.loading.models.MODEL_SPECS`), a line each."""
    width = max(len(spec) for spec, _ in MODEL_SPECS) + 2
    return "\n".join(f"{indent}{spec:<{width}}{desc}" for spec, desc in MODEL_SPECS)


MODEL_FLAGS = {**{f"model {spec} with weights=": f"--model {spec} --weights" for spec in
                  ("torchvision:resnet50", "timm:resnet50")}, "torchvision:ARCH with weights=": "--model "
               "torchvision:ARCH --weights", 'weights="random"': "--weights random", "weights=": "--weights",
               "trust_pickle=True": "--trust-pickle"}
"""The keywords of :func:`salience.load_model` that its errors name, as the commands' flags; its examples of a
spec with weights (``model timm:resnet50 with weights=PATH``) as the command line says them (``--model
timm:resnet50 --weights PATH``)."""


RUN_FLAGS = {"overwrite=True": "--overwrite"}
"""What a refusal of a dataset run's folder names (a damaged or unreadable ``run.json``: start again with
``overwrite=True``, :data:`salience.runs.store.START_AGAIN`), as the commands' flags: ``salience explain DIR --out RUN
--overwrite`` (a dataset run) and ``salience explore RUN`` (which reads runs) say it alike."""


def output_arg(args: argparse.Namespace) -> Any:
    """``--output`` as :func:`salience.load_model` takes it: an integer (a tuple index) or a key; ``None`` when not
    given (or the command has no ``--output``)."""
    output = getattr(args, "output", None)
    if output is not None and re.fullmatch(r"-?\d+", output.strip()):
        output = int(output)
    return output


def output_flag_said(message: str, args: argparse.Namespace) -> str:
    """``message`` with ``output=PICK`` (:func:`salience.load_model`'s keyword, as the errors of the model's first
    forward pass name it: ``output='logits' does not fit: the model returned a tensor``) said as the flag the user
    gave, ``--output logits``. Those errors come after the model is loaded, outside :func:`load_model_arg`."""
    pick = output_arg(args)
    return message if pick is None else message.replace(f"output={pick!r}", f"--output {pick}")


def load_model_arg(args: argparse.Namespace) -> nn.Module:
    """The model that :func:`add_model_args`'s options name (its errors said with the flags)."""
    with flag_errors(MODEL_FLAGS, args):
        return load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle, device=args.device,
                          output=output_arg(args))


# --------------------------------------------------------------------------------- scores


def scores(model: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """The model's outputs ``(N, K)`` for ``x`` ``(N, C, H, W)``: no gradient, ``batch_size`` images
    per forward, a final softmax kept (the printed probabilities are the model's own)."""
    out = forward_scores(model, x, strip_softmax=False, batch_size=batch_size)
    return out.reshape(out.shape[0], -1) if out.dim() != 2 else out


def probabilities(out: Tensor) -> Tensor:
    """Class probabilities: ``out`` itself if it already is (rows of a softmax), else its softmax; a
    single logit's sigmoid (:func:`salience._core.autograd.class_probabilities`)."""
    return class_probabilities(out.float())


# --------------------------------------------------------------------------------- files and pictures


def output_folder(path: str) -> Path:
    """The folder ``path`` (``--out``), created with its parents; a :class:`SalienceError` if it cannot be."""
    check_no_file_in_way(path)
    return make_folder(path, "--out ")


def check_no_file_in_way(path: str, flag: str = "--out", names_file: bool = False) -> None:
    """A :class:`SalienceError` when the output folder ``path`` (``flag``'s value), or a folder above it, is an
    existing file: a command checks it before loading the model, so nothing is computed for results that could not
    be written. ``path`` itself a file is said as one (``mkdir``'s own words, ``File exists``, read as if the folder
    were there); a file above it as ``mkdir`` says it. ``names_file``: ``path`` is the output file (``visualize
    --out class.png``), and only the folders above it are checked. A link to nothing is in the way as a file is
    (``mkdir`` cannot make a folder there); a name the system will not look at (too long, no permission) is said
    with the flag (it was an unexpected ``OSError``, exit 3)."""
    target = Path(path)
    for p in [*target.parents] if names_file else [target, *target.parents]:
        kind = path_kind(p, flag, path)
        if kind is None:
            continue
        if kind == "folder":
            check_writable(p, flag, path)
            return
        if kind == "link":
            raise SalienceError(f"{flag} {path}: {p} is a link to {os.readlink(p)}, which is not there; create that "
                                f"folder or choose another {flag}")
        if p == target:
            raise SalienceError(f"{flag} {path} is a file, not a folder; choose another {flag}")
        if names_file:
            raise SalienceError(f"{flag} {path}: {p} is a file, not a folder; choose another {flag}")
        raise SalienceError(f"cannot create the output folder {target} (Not a directory)")


def check_writable(folder: Path, flag: str, given: str) -> None:
    """A :class:`SalienceError` naming ``flag`` and its value ``given`` when the existing ``folder`` (the output
    folder, or the nearest folder above it that is there) cannot be written in (no permission, a read-only or
    immutable folder): said before the model is loaded, not after every map is computed (a dataset run stopped with
    an unexpected ``PermissionError``, exit 3, opening its lock file there)."""
    try:  # a file made and removed: os.access alone is wrong both ways on network file systems (NFS, SMB: the
        # server decides), with ACLs, for root (an immutable folder) and on a read-only mount's overlay
        with tempfile.TemporaryFile(dir=folder, prefix=".salience-write-check-"):
            pass
    except OSError as e:
        why = "no permission to write there, or a read-only folder" if e.errno in (
            errno.EACCES, errno.EPERM, errno.EROFS) else (e.strerror or type(e).__name__)  # a full disk: said so
        raise SalienceError(f"{flag} {given}: cannot write in the folder {folder} ({why}); choose another {flag}") \
            from None


def writable_out(path: str, flag: str = "--out") -> None:
    """:func:`check_writable` of the output folder ``path`` if it is there, else of the nearest folder above it that
    is (nothing when something else is in the way, or for an object storage URL: the command that makes the folder
    says that; ``s3://b/r`` as a ``Path`` is ``s3:/b/r``, whose nearest folder is the working one)."""
    if is_remote(path):
        return
    for p in [Path(path), *Path(path).parents]:
        kind = path_kind(p, flag, path)
        if kind == "folder":
            check_writable(p, flag, path)
        if kind is not None:
            return


def path_kind(p: Path, flag: str, given: str) -> Optional[str]:
    """What is at ``p``: ``"folder"`` (a link to one included), ``"link"`` (a link to nothing), ``"file"`` (anything
    else) or ``None`` (nothing); a :class:`SalienceError` naming ``flag`` and its value ``given`` when the system will
    not say (a name too long, a folder without permission): ``Path.exists`` raises those as ``OSError``."""
    try:
        if p.is_dir():
            return "folder"
        if p.is_symlink() and not p.exists():
            return "link"
        return "file" if p.exists() else None
    except OSError as e:
        raise SalienceError(f"{flag} {given}: {e.strerror or e}; choose another {flag}") from None


def safe_name(name: str) -> str:
    """``name`` as a file name part: runs of other characters than ``A-Za-z0-9._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def to_image(x: Tensor) -> Tensor:
    """An image tensor ``(1|3, H, W)`` -> ``(3, H, W)`` for pictures."""
    return x.repeat(3, 1, 1) if x.shape[0] == 1 else x[:3]


def figure(images: Tensor, maps: dict[str, Tensor], row_labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """The side-by-side figure (:func:`salience.viz.figure`): a row per image, then each map and
    its overlay; small images (the 64-pixel demo shapes) are enlarged to 160-pixel tiles."""
    tile = max(int(images.shape[-2]), 160)
    return viz.figure(images, maps, row_labels=row_labels, scale_to=tile)
