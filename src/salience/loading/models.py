"""Models in: a spec string -> an ``nn.Module`` in eval mode with its preprocessing attached.

:func:`load_model` turns a spec string into a model in eval mode with its ``ModelInfo``
attached. Specs: ``demo:NAME`` (bundled, :mod:`salience.zoo`), ``torchvision:ARCH`` (with
``weights=FILE`` a state dict, ``weights="random"`` random weights, or by default torchvision's
own pretrained weights, fetched by torchvision), a TorchScript file, a Keras file
(``.keras``/``.h5``), or an ONNX file (through ``onnx2torch`` when it is installed). Files are
never unpickled unless ``trust_pickle=True``.
"""
from __future__ import annotations

import dataclasses
import numbers
import operator
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from salience._core.errors import SalienceError, suggest, user_stacklevel
from salience._core.files import file_start, read_text
from salience._core.info import ModelInfo, attach_info, model_info
from salience._core.tensors import check_flag

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODEL_SPECS", "load_model", "resolve_device", "imagenet_class_names", "read_labels",
           "name_classes", "read_state_dict", "load_state"]

PathLike = Union[str, "os.PathLike[str]"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_KERAS_EXT = (".keras", ".h5", ".hdf5")
_ONNX_EXT = (".onnx",)
_MODEL_FILE_EXT = (".pt", ".pth", ".ts", ".pt2", ".safetensors", ".bin", ".ckpt", ".jit") + _KERAS_EXT + _ONNX_EXT

MODEL_SPECS: tuple[tuple[str, str], ...] = (
    ("demo:NAME", "a bundled demo model, no download (salience list names them)"),
    ("torchvision:ARCH", "a torchvision classifier: --weights FILE (a state dict), --weights random, or "
                         "torchvision's pretrained weights (downloaded by torchvision)"),
    ("timm:NAME", "a timm architecture (needs timm): --weights FILE (a state dict), --weights random, or "
                  "timm's pretrained weights from the local cache (never downloaded); NAME.TAG for a pretrained "
                  "tag, NAME.TAG@REVISION for a branch, tag or commit of the hub repo timm/NAME.TAG in the cache "
                  "(no --weights)"),
    ("hf:DIR_OR_ID", "a Hugging Face transformers image classifier (needs transformers): a save_pretrained "
                     "folder, or a model id in the local Hugging Face cache, ID@REVISION for a branch, tag "
                     "or commit (offline; never downloaded)"),
    ("python:MODULE:FUNC", "your own code: python:mypkg.nets:build or python:path/to/file.py:build returns the "
                           "nn.Module; --weights FILE a state dict for it"),
    ("FILE.pt / .pth / .ts", "a TorchScript archive (torch.jit.save); a state dict alone needs "
                             "torchvision:ARCH / timm:NAME / python:... --weights FILE"),
    ("FILE.pt2", "a torch.export program (torch.export.save), exported in eval mode with a dynamic batch"),
    ("FILE.keras / .h5 / .hdf5", "a Keras model (needs keras)"),
    ("FILE.onnx", "an ONNX model (needs onnx2torch)"),
)
"""Every model spec :func:`load_model` accepts, as ``(spec, description)``: the one list that the
command line's ``--model`` help and ``salience list`` print."""


def expand_home(text: str) -> str:
    """``text`` with a leading ``~`` as the home folder (as the shell reads it), unless that names nothing and
    ``text`` itself names something: a path under a folder literally called ``~`` in the working directory."""
    home = os.path.expanduser(text)
    return text if home != text and not os.path.exists(home) and os.path.exists(text) else home


def path_arg(value: Any, what: str) -> Path:
    """``value`` (a ``str`` or ``os.PathLike``; ``~`` expanded, :func:`expand_home`) as a ``Path``; anything
    else, or an empty string, is a :class:`SalienceError` naming ``what`` and what it got."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if isinstance(text, str) and text.strip():
            return Path(expand_home(text))
    if isinstance(value, (bytes, bytearray)):
        got = "bytes (decode a path with .decode(); a file's contents are no path)"
    else:
        got = "an empty string" if isinstance(value, str) else f"a {type(value).__name__}"
    raise SalienceError(f"{what} must be a file path (a str or pathlib.Path), got {got}")


def _torchvision_info(arch: str, num_classes: int, weights_enum) -> ModelInfo:
    """ImageNet preprocessing (from the weights' transforms where known) and class names."""
    crop, resize = 224, 256
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    categories = None
    if weights_enum is not None:
        try:
            t = weights_enum.transforms()
            crop = int(t.crop_size[0]) if isinstance(t.crop_size, (list, tuple)) else int(t.crop_size)
            resize = int(t.resize_size[0]) if isinstance(t.resize_size, (list, tuple)) else int(t.resize_size)
            mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        except Exception:  # noqa: BLE001 - a transform without these fields: keep ImageNet's
            pass
        cats = weights_enum.meta.get("categories")
        if cats and len(cats) == num_classes:
            categories = tuple(str(c) for c in cats)
    return ModelInfo(
        name=f"torchvision:{arch}",
        input_size=(crop, crop),
        resize=resize,
        mean=mean,
        std=std,
        class_names=categories,
        task="classification",
    )


def _num_outputs(model: nn.Module) -> Optional[int]:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    return last


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SalienceError(f"{path}: reading .safetensors files needs safetensors; pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a bad file
        text = str(e).strip()
        raise SalienceError(f"{path}: not a safetensors file salience can read "
                            f"({text.splitlines()[0] if text else type(e).__name__})") from None


def read_state_dict(path: PathLike, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A state dict (parameter name -> tensor) from a file: ``.safetensors``, or a PyTorch file
    read with ``torch.load(weights_only=True)`` unless ``trust_pickle``. A checkpoint's
    ``state_dict`` / ``model`` entry is taken, and ``module.`` / ``_orig_mod.`` prefixes removed. A module's extra
    state (an ``_extra_state`` entry, :func:`is_extra_state`) may be any object, as torch's ``load_state_dict`` takes."""
    trust_pickle = check_flag(trust_pickle, "trust_pickle")
    p = path_arg(path, "the weights file")
    if not p.is_file():
        raise _no_weights_file(p)
    return _read_state_dict(p, trust_pickle)


def _no_weights_file(p: Path) -> SalienceError:
    """A weights path that is no file: a folder, a missing path, or a misspelt ``"random"``."""
    if p.is_dir():
        return SalienceError(f"weights file {p}: is a directory; expected a state-dict file (.pt, .pth, .safetensors)")
    near = str(p).strip().lower() == "random"
    return SalienceError(f"weights file {p}: no such file; check the path"
                         + ('; weights="random" (lower case) for random weights' if near else ""))


def load_state(model: nn.Module, state: dict, path: PathLike, what: str) -> nn.Module:
    """Load ``state`` into ``model`` (strict); a mismatch is one line naming the first keys that differ.
    ``state`` must be a dict of parameter name -> tensor (:func:`read_state_dict` makes one); an ``_extra_state``
    entry goes to its module's ``set_extra_state`` as it is, as torch's ``load_state_dict`` does."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"load_state needs a torch.nn.Module, got {type(model).__name__}")
    _check_state(state, path)
    own = model.state_dict()
    mismatch = state_mismatch(own, state)
    if mismatch:
        raise SalienceError(f"{path}: the state dict does not fit {what} ({mismatch})")
    model.load_state_dict(with_counts(own, state))
    return model


def _check_state(state: Any, path: Any) -> None:
    """``state`` is a mapping of str -> Tensor, or a :class:`SalienceError` says what it is."""
    if not isinstance(state, Mapping):
        hint = "; read the file first: read_state_dict(path)" if isinstance(state, (str, os.PathLike)) else ""
        raise SalienceError(f"{path}: expected a state dict (a dict of parameter name -> tensor), "
                            f"got {type(state).__name__}{hint}")
    for k, v in state.items():
        if not isinstance(k, str) or not (isinstance(v, Tensor) or is_extra_state(k)):
            hint = " (a numpy array: torch.from_numpy(a))" if type(v).__module__ == "numpy" else ""
            raise SalienceError(f"{path}: a state dict maps parameter names (str) to tensors; {k!r} holds a "
                                f"{type(v).__name__}{hint}")


def is_extra_state(key: Any) -> bool:
    """A module's extra state (``get_extra_state``): any object, not only a tensor, which torch's
    ``load_state_dict`` hands to the module's ``set_extra_state`` as it is, whatever its shape."""
    return isinstance(key, str) and key.rpartition(".")[2] == "_extra_state"


def _is_count(key: str) -> bool:
    """A BatchNorm's ``num_batches_tracked``: a count of training steps, no weight. State dicts saved before
    PyTorch 0.4.1 (torchvision's first ResNet files) or converted from other libraries have none, and torch
    keeps the module's own when it loads them."""
    return key.rpartition(".")[2] == "num_batches_tracked"


def with_counts(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``state`` with the BatchNorm counts it lacks (:func:`_is_count`) taken from ``own``, as torch does for a
    state dict without version metadata: a strict ``load_state_dict`` then loads it whatever its metadata says."""
    gaps = [k for k in own if _is_count(k) and k not in state]
    if not gaps:
        return state
    full: Any = OrderedDict(state)
    full.update((k, own[k]) for k in gaps)
    if getattr(state, "_metadata", None) is not None:
        full._metadata = state._metadata  # type: ignore[attr-defined]
    return full


def state_mismatch(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """The first keys missing from ``state`` (but BatchNorm counts, :func:`_is_count`), unexpected in it and of
    another shape than in ``own``, as one short line (``""`` when it fits)."""
    missing = [k for k in own if k not in state and not _is_count(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and not is_extra_state(k) and tuple(state[k].shape) != tuple(own[k].shape)]
    return "; ".join(f"{label} {', '.join(keys[:3])}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}"
                     for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys)


def _is_safetensors(path: Path) -> bool:
    """``path`` is a safetensors file by its name, or by its start (an 8-byte header length, then a JSON object)
    whatever its name (a ``.bin`` / ``.pt`` that holds one)."""
    if path.suffix.lower() == ".safetensors":
        return True
    head = file_start(path, 9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_state_dict(path: Path, trust_pickle: bool) -> dict:
    safetensors = _is_safetensors(path)
    archive = None if safetensors else _archive_kind(path)  # by its content: a TorchScript file named .pt2 too
    whole = ARCHIVE_KINDS[archive] if archive else \
        ARCHIVE_KINDS["export"] if path.suffix.lower() == ".pt2" else None
    if whole:
        raise SalienceError(f"{path}: {whole} is a whole model, not a state dict: load it by itself, "
                            f"load_model({str(path)!r}), without an architecture or weights")
    if safetensors and trust_pickle:
        _needless_trust(path, "a safetensors file loads without unpickling code")
    obj = _read_safetensors(path) if safetensors else _torch_load(path, trust_pickle, weights=True)
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) or is_extra_state(k)
                                                       for k, v in obj.items()):
        raise SalienceError(
            f"{path}: expected a state dict (a dict of parameter name -> tensor, made with "
            f"torch.save(model.state_dict(), path)), got {type(obj).__name__}"
        )
    # Weights saved from DataParallel / torch.compile carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")
"""The entries of a training checkpoint (a dict) that may hold its state dict, in the order they are looked for."""


def _holds_weights(obj: dict) -> bool:
    """Whether the loaded dict ``obj`` is a state dict: a tensor among its values, or a checkpoint's entry
    (``state_dict``, ``model`` ...) that is a dict (as :func:`_read_state_dict` takes it)."""
    return any(isinstance(v, Tensor) for v in obj.values()) or any(
        isinstance(obj.get(k), dict) for k in _CHECKPOINT_KEYS)


def _torch_load(path: Path, trust_pickle: bool, weights: bool = False):
    """``torch.load`` of ``path``, its errors said in one line. ``weights``: ``path`` is a ``weights=`` file, and
    what is expected is a state dict (a model file is TorchScript or a state dict)."""
    import pickle

    expected = ("a state dict (torch.save(model.state_dict())) or a .safetensors file" if weights else
                "a state dict (torch.save(model.state_dict())) or TorchScript (torch.jit.save)")

    start = file_start(path, 4)
    if not start:
        raise SalienceError(f"{path}: the file is empty; save the model again")
    # torch.save writes a zip archive (a pickle, protocol 2+, before PyTorch 1.6): anything else is no PyTorch file
    # (an ONNX file, a text file), and trust_pickle would not help
    foreign = not (start.startswith(b"PK") or start[:1] == b"\x80")
    if trust_pickle and start.startswith(b"PK") and _loads_safely(path):
        _needless_trust(path, "it holds tensors and plain values only, which load without unpickling code")
        trust_pickle = False  # read as without it: the same objects
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a foreign file
        if foreign:
            raise SalienceError(f"{path}: not a PyTorch {'weights' if weights else 'model'} file (torch.save writes a "
                                f"zip archive or a pickle; this is neither); expected {expected}") from None
        if isinstance(e, pickle.UnpicklingError) and not trust_pickle and "weights only" in str(e).lower():
            raise SalienceError(
                f"{path}: contains pickled Python objects (e.g. a whole model saved with torch.save(model)), "
                "which can run arbitrary code when loaded, so salience refused it. If you trust the file, "
                "pass trust_pickle=True; better, save a state dict or TorchScript"
            ) from None
        text = str(e).strip()
        msg = text.splitlines()[0] if text and not isinstance(e, KeyError) else type(e).__name__
        if trust_pickle and isinstance(e, (AttributeError, ImportError)):  # said "not a PyTorch model file" of one
            raise SalienceError(
                f"{path}: holds pickled Python objects (e.g. a whole model saved with torch.save(model)) whose class "
                f"or module cannot be found in this process ({msg}): unpickling needs the code that defined them "
                "importable. Save a state dict instead and give its architecture (python:FILE.py:FUNC with "
                "weights=PATH)" + ("" if weights else ", or save TorchScript")
            ) from None
        raise SalienceError(
            f"{path}: not a PyTorch {'weights' if weights else 'model'} file salience can read ({msg}); "
            f"expected {expected}"
        ) from None


def _loads_safely(path: Path) -> bool:
    """Whether the zip archive ``path`` (what ``torch.save`` writes) loads with ``weights_only=True``: tried
    memory-mapped, so that its tensors are not read (a checkpoint of 500 MB whose pickled object comes after its
    weights is not read twice; session 54's review). A pickle of before PyTorch 1.6 cannot be mapped: not tried."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - it needs unpickled code (or is no checkpoint): read as before
        return False
    return True


def _needless_trust(path: Path, why: str) -> None:
    """The warning that ``trust_pickle=True`` was given for a file that needs no unpickling (TorchScript, a
    ``.pt2`` program, safetensors, a state dict that ``torch.load(weights_only=True)`` reads): ``why`` says why."""
    warnings.warn(f"{path}: trust_pickle=True was not needed: {why}; leave it out", stacklevel=user_stacklevel())


def _is_torchscript(path: Path) -> bool:
    return _archive_kind(path) == "torchscript"


ARCHIVE_KINDS = {"torchscript": "a TorchScript archive (torch.jit.save)",
                 "export": "a torch.export program (torch.export.save)"}
"""What a whole-model archive is, in words, by :func:`_archive_kind`."""


def _archive_kind(path: Path) -> Optional[str]:
    """What the zip archive ``path`` holds, by its entries, whatever its name: ``"torchscript"``
    (``torch.jit.save``: ``code/``, ``constants.pkl``), ``"export"`` (``torch.export.save``: ``archive_format``)
    or ``None`` (anything else: ``torch.save``'s archive, no zip)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return "export"
    return None


def _torchvision_pretrained(tvm, arch: str, weights_enum) -> nn.Module:
    """torchvision's own pretrained weights for ``arch`` (downloaded by torchvision on first use)."""
    if weights_enum is None:
        raise SalienceError(
            f"torchvision has no pretrained weights for {arch!r}; pass weights=FILE (a state dict) "
            "or weights=\"random\""
        )
    try:
        return tvm.get_model(arch, weights=weights_enum)
    except Exception as e:  # noqa: BLE001 - any download failure becomes one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SalienceError(
            f"could not get torchvision's pretrained weights for {arch} ({type(e).__name__}: {msg}); "
            "torchvision downloads them on first use, which needs the internet. Pass weights=FILE "
            "(a state dict) or weights=\"random\" to explain random weights"
        ) from None


def _torchvision_from_file(tvm, arch: str, wpath: Path, trust_pickle: bool) -> nn.Module:
    """torchvision's ``arch`` with a state dict from ``wpath`` (also one fine-tuned to other classes)."""
    state = read_state_dict(wpath, trust_pickle=trust_pickle)
    model = tvm.get_model(arch, weights=None)
    own = model.state_dict()
    mismatch = state_mismatch(own, state)
    if not mismatch:
        model.load_state_dict(with_counts(own, state))
        return model
    # A model fine-tuned to another number of classes: the last 2-D weight says how many.
    mats = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    n = int(mats[-1].shape[0]) if mats else None
    if n is not None:
        try:
            other = tvm.get_model(arch, weights=None, num_classes=n)
        except (RuntimeError, TypeError, ValueError):
            other = None
        theirs = other.state_dict() if other is not None else None
        if other is not None and not state_mismatch(theirs, state):
            other.load_state_dict(with_counts(theirs, state))
            return other
    raise SalienceError(f"{wpath}: the state dict does not fit torchvision's {arch} ({mismatch}); check the "
                        "architecture name")


def _load_torchvision(arch: str, weights: Optional[PathLike], trust_pickle: bool) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise SalienceError(
            f"torchvision:{arch} needs torchvision, which is not installed; pip install torchvision"
        ) from None
    names = tvm.list_models()
    if arch not in names:
        raise SalienceError(
            f"unknown torchvision model {arch!r}{suggest(arch, names)} "
            "(see torchvision.models.list_models() for all names)"
        )
    try:
        weights_enum = tvm.get_model_weights(arch).DEFAULT
    except Exception:  # noqa: BLE001 - architectures without published weights
        weights_enum = None

    if weights is None:
        model = _torchvision_pretrained(tvm, arch, weights_enum)
    elif str(weights) == "random":
        model = tvm.get_model(arch, weights=None)
    else:
        model = _torchvision_from_file(tvm, arch, Path(weights), trust_pickle)  # load_model's path_arg made it
    n = _num_outputs(model) or 1000
    return attach_info(model.eval(), _torchvision_info(arch, n, weights_enum))


def _unpickled_nothing(path: Path, suffix: str) -> Optional[str]:
    """What the model file ``path`` is where loading it unpickles nothing (``trust_pickle`` is needless there):
    ``"a TorchScript archive"`` and the like; ``None`` for a file ``torch.load`` reads."""
    if suffix in _KERAS_EXT + _ONNX_EXT:
        return f"a {'Keras' if suffix in _KERAS_EXT else 'ONNX'} file"
    if suffix == ".pt2":
        return "a torch.export program (.pt2)"
    return "a TorchScript archive" if suffix != ".safetensors" and _is_torchscript(path) else None


def _load_file(path: Path, trust_pickle: bool) -> nn.Module:
    suffix = path.suffix.lower()
    kind = _unpickled_nothing(path, suffix) if trust_pickle else None
    if kind is not None:
        _needless_trust(path, f"{kind} loads without unpickling code")
    if suffix in _KERAS_EXT:
        try:
            from salience.loading.keras import load_keras  # type: ignore[attr-defined]
        except ImportError as e:
            missing = getattr(e, "name", "") or ""
            need = "keras (pip install keras)" if missing.split(".")[0] == "keras" else \
                "salience's Keras support (salience.loading.keras), which this installation lacks"
            raise SalienceError(f"{path}: loading Keras models needs {need}") from None
        return load_keras(path)
    if suffix in _ONNX_EXT:
        try:
            import onnx2torch  # type: ignore[import-not-found]
        except ImportError:
            raise SalienceError(
                f"{path}: ONNX models are supported only through onnx2torch, which is not installed; "
                "pip install onnx2torch, or convert the model to TorchScript (torch.jit.save) where it was made"
            ) from None
        try:
            model = onnx2torch.convert(_onnx_without_aliases(path))
        except Exception as e:  # noqa: BLE001 - converter errors become one line
            raise SalienceError(
                f"{path}: onnx2torch could not convert this ONNX model ({type(e).__name__}: {e}); it converts "
                "a subset of ONNX: give the PyTorch model if you have it (torchvision:ARCH with weights=FILE, "
                "python:MODULE:CALLABLE, a .pt2 from torch.export.save)") from None
        return model
    archive = _archive_kind(path) if suffix != ".safetensors" else None
    if (suffix == ".pt2") != (archive == "export") and archive is not None:  # read as its name says, it failed
        # with torch's "PytorchStreamReader failed locating file ...: checkpoint corrupted"
        raise SalienceError(
            f"{path}: is {ARCHIVE_KINDS[archive]}, named {suffix or 'without a suffix'}; salience reads "
            + ("a .pt2 file as a torch.export program: rename it .pt" if suffix == ".pt2" else
               "torch.export programs from .pt2 files only: rename it .pt2"))
    if suffix == ".pt2":
        from salience.loading.custom import load_exported

        return load_exported(path)
    if suffix == ".safetensors":
        raise SalienceError(
            f"{path}: a .safetensors file holds weights only; give its architecture too, e.g. "
            f"model timm:resnet50 with weights={path} (or torchvision:ARCH, python:MODULE:FUNC)"
        )
    if archive == "torchscript":  # by its entries, read once above
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else "RuntimeError"
            raise SalienceError(f"{path}: a TorchScript archive that torch.jit.load could not read ({msg})") from None
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj  # only reachable with trust_pickle=True
    raise _not_a_model(path, obj)


def _not_a_model(path: Path, obj: Any) -> SalienceError:
    """Why what ``torch.load`` read from the model file ``path``, ``obj``, is no model: a state dict (its
    architecture wanted too), another dict, or another object."""
    if isinstance(obj, dict) and _holds_weights(obj):
        return SalienceError(
            f"{path}: holds a state dict (weights only); give its architecture too, e.g. "
            f"model torchvision:resnet50 with weights={path}, or save the model as TorchScript"
        )
    if isinstance(obj, dict):  # "holds a state dict (weights only)" was said of a dict of anything
        keys = ", ".join(repr(k) for k in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        return SalienceError(f"{path}: holds a dict ({keys or 'empty'}) that is no model and no state dict (parameter "
                             "name -> tensor); expected TorchScript (torch.jit.save) or a state dict, as weights= "
                             "beside its architecture")
    return SalienceError(
        f"{path}: holds a {type(obj).__name__}, not a model; expected TorchScript (torch.jit.save) "
        "or a state dict, as weights= beside its architecture"
    )


_WEIGHTS_SPECS = ("torchvision:", "timm:", "python:")


def _onnx_without_aliases(path: Path) -> Any:
    """The ONNX model at ``path`` with every ``Identity`` of an initializer replaced by a copy of
    that initializer under the Identity's output name. ``torch.onnx.export``'s TorchScript-based
    exporter (``dynamo=False``) stores equal weights once and names the others through ``Identity``
    nodes (a fresh resnet18's BatchNorm-folded convolutions share their biases); onnx2torch reads a
    convolution's weights from the initializers by name and fails there ("KeyError: 'onnx::Conv_197'",
    or "Converter is not implemented ... Identity" at opset 19). The function is the same."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        src = node.input[0] if node.op_type == "Identity" and node.input else None
        if src in inits and node.output[0] not in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[src])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            kept.append(node)
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    return proto


RANDOM_WEIGHTS_SEED = 0
"""``weights="random"`` draws its weights from a generator seeded with this (the global RNG is
neither used nor changed): every load, in any process, has the same weights, so that a dataset
run stopped and continued explains with the same model, and two commands compare."""


def load_model(
    spec: Union[str, "os.PathLike[str]"],
    *,
    weights: Optional[PathLike] = None,
    trust_pickle: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    output: Any = None,
) -> nn.Module:
    """Load a model from a spec string, in eval mode, with its :class:`ModelInfo` attached.

    ``spec`` (:data:`MODEL_SPECS`): ``"demo:NAME"`` (a bundled demo model, see
    ``salience.zoo.DEMOS``); ``"torchvision:ARCH"`` (``weights``: a state-dict file, ``"random"``
    (the same random weights at every load, :data:`RANDOM_WEIGHTS_SEED`), or ``None`` for
    torchvision's pretrained weights, which torchvision downloads);
    ``"timm:NAME"`` (``weights`` as for torchvision; ``None``: timm's pretrained weights from the
    local cache, never downloaded; ``"timm:NAME.TAG@REVISION"`` for a branch, tag or commit of the
    hub repo ``timm/NAME.TAG``, without ``weights``); ``"hf:DIR_OR_ID"`` (a transformers image classifier, offline;
    ``"hf:ORG/NAME@REVISION"`` for a branch, tag or commit in the cache);
    ``"python:MODULE:FUNC"`` / ``"python:FILE.py:FUNC"`` (your function, called with no argument,
    returns the model; ``weights`` a state dict for it); or a file: TorchScript
    (``.pt``/``.pth``/``.ts``...), a ``torch.export`` program (``.pt2``), Keras
    (``.keras``/``.h5``) or ONNX (``.onnx``, needs ``onnx2torch``). State dicts may be
    ``.safetensors``. Pickled files are loaded only with ``trust_pickle=True`` (unpickling can run
    arbitrary code). ``device``: where to put the model (default: CPU; ``"auto"``: CUDA when there is
    one; a device that is not there is refused before loading). ``output``: which part of
    what the model returns holds the scores (:func:`salience.loading.select_output`).
    Raises :class:`SalienceError` with one line saying what went wrong and what to do.
    """
    trust_pickle = check_flag(trust_pickle, "trust_pickle")
    s = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(s, str) or not s:
        raise SalienceError(f"expected a model spec such as 'demo:shapes' (a str, or the path of a model file), "
                            f"got {spec!r}")
    if weights is not None and not (isinstance(weights, str) and weights == "random"):
        weights = path_arg(weights, "weights (a state-dict file, or \"random\")")
    device = resolve_device(device)
    s = expand_home(s)
    is_file = Path(s).exists() and not s.startswith(("hf:", "python:"))
    if weights is not None and (is_file or not s.startswith(_WEIGHTS_SPECS)):
        raise SalienceError(
            f"weights {os.fspath(weights)!r} go with a torchvision:ARCH, timm:NAME or python:MODULE:FUNC model; "
            f"{s!r} carries its own weights"
        )
    if weights is not None and str(weights) == "random":
        with torch.random.fork_rng(devices=[]):  # the same random weights in every process; the caller's RNG kept
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = _load_spec(s, is_file, weights, trust_pickle)
    else:
        model = _load_spec(s, is_file, weights, trust_pickle)
    if not isinstance(model, nn.Module):
        raise SalienceError(f"{s}: loaded a {type(model).__name__}, expected a torch.nn.Module")
    model.eval()
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as e:  # a device torch knows but cannot use (no driver, ...)
            first = (str(e).strip().splitlines() or [""])[0]
            raise SalienceError(f"device {str(device)!r}: cannot move {s} there ({first}); use cpu or auto") from None
    if getattr(model, "salience_info", None) is None or not isinstance(model.salience_info, ModelInfo):
        base = model_info(model)
        name = Path(s).name if is_file else s
        attach_info(model, ModelInfo(name=name, input_size=base.input_size, channels=base.channels))
    if output is not None:
        from salience.loading.custom import select_output

        select_output(model, output)
    return model


def resolve_device(device: Optional[Union[str, torch.device]]) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` that is there: ``None`` stays ``None`` (the model stays on the
    CPU), ``"auto"`` is CUDA when there is one, else the CPU. A string torch does not know, or a CUDA
    (or MPS) device this machine lacks, is a :class:`SalienceError` naming it (checked before a model
    is loaded, so that a typo does not cost a load)."""
    if device is None:
        return None
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise SalienceError(f"device {device!r}: not a device torch knows; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SalienceError(f"device {device!r}: no CUDA device here (torch.cuda.is_available() is False); "
                                "use cpu, or auto (CUDA when there is one)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SalienceError(f"device {device!r}: no CUDA device {dev.index} here ({count} device(s): "
                                f"cuda:0..cuda:{count - 1})")
    elif dev.type == "meta":
        raise SalienceError(f"device {device!r}: a meta device holds no weights, so the model could not run there; "
                            "use cpu, cuda or auto")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SalienceError(f"device {device!r}: no MPS device here; use cpu or auto")
    return dev


def _load_spec(s: str, is_file: bool, weights: Optional[PathLike], trust_pickle: bool) -> nn.Module:
    """The model a spec names (before eval mode, device and info)."""
    prefix = next((p for p in ("demo:", "torchvision:", "timm:", "hf:") if s.startswith(p)), None)
    if prefix and not is_file and not s[len(prefix):].strip():
        what = {"demo:": "NAME", "torchvision:": "ARCH", "timm:": "NAME", "hf:": "DIR_OR_ID"}[prefix]
        raise SalienceError(f"model {s!r} names no model: expected {prefix}{what}"
                            + (" (salience list names them)" if prefix == "demo:" else ""))
    if s.startswith("demo:") and not is_file:
        from salience.demo import zoo

        name = s[len("demo:"):]
        if name not in zoo.DEMOS:
            raise SalienceError(
                f"unknown demo model {name!r}{suggest(name, list(zoo.DEMOS))} "
                f"(available: {', '.join('demo:' + n for n in zoo.DEMOS)})"
            )
        return zoo.load_demo(name)
    if s.startswith("torchvision:") and not is_file:
        return _load_torchvision(s[len("torchvision:"):], weights, trust_pickle)
    if s.startswith(("timm:", "hf:")) and not is_file:
        from salience.loading import libraries

        if s.startswith("timm:"):
            return libraries.load_timm(s[len("timm:"):], weights, trust_pickle)
        return libraries.load_hf(expand_home(s[len("hf:"):]))
    if s.startswith("python:"):
        from salience.loading.custom import load_python

        return load_python(s[len("python:"):], weights, trust_pickle)
    if is_file:
        p = Path(s)
        if p.is_dir():
            raise SalienceError(f"{p}: is a directory; expected a model file, hf:{p} for a Hugging Face folder, "
                                "or 'demo:NAME' / 'torchvision:ARCH'")
        return _load_file(p, trust_pickle)
    raise _unknown_spec(s)


def _unknown_spec(s: str) -> SalienceError:
    """A spec that names nothing: a missing file (a path), a hub id without its library (``ORG/NAME``), a
    torchvision architecture without ``torchvision:``, or an unknown name."""
    from salience.demo import zoo

    demos = ["demo:" + n for n in zoo.DEMOS]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", s) and Path(s).suffix.lower() not in _MODEL_FILE_EXT \
            and not Path(s).parent.exists():
        head = f"unknown model {s!r}: a hub model id goes with its library, hf:{s} (transformers)" + (
            f" or timm:{s[len('timm/'):]}" if s.startswith("timm/") else "") + "; a file of that name is not here"
        hint = ""
    elif "/" in s or os.sep in s or s.startswith("~") or Path(s).suffix.lower() in _MODEL_FILE_EXT:
        head, hint = f"model file {s}: no such file; check the path", ""
    else:
        head, hint = f"unknown model {s!r}", suggest(s, demos) or suggest("demo:" + s, demos)
        try:
            from torchvision.models import list_models

            hint = f"; did you mean 'torchvision:{s}' (or 'timm:{s}')?" if s in list_models() else hint
        except Exception:  # noqa: BLE001 - torchvision missing or too old: the demos' hint stays
            pass
    return SalienceError(
        f"{head}{hint} (expected demo:NAME ({', '.join(demos)}), torchvision:ARCH, timm:NAME, "
        "hf:DIR_OR_ID, python:MODULE:FUNC, or the path of an existing model file)"
    )


# --------------------------------------------------------------------------------- class names


def imagenet_class_names() -> Optional[tuple[str, ...]]:
    """The 1000 ImageNet-1k class names as torchvision ships them (no network), or ``None``
    without torchvision."""
    try:
        from torchvision.models import get_weight
        cats = get_weight("ResNet50_Weights.IMAGENET1K_V1").meta.get("categories")
    except Exception:  # noqa: BLE001 - torchvision missing, or a version without this metadata
        return None
    return tuple(str(c) for c in cats) if cats and len(cats) == 1000 else None


def read_labels(path: PathLike) -> tuple[str, ...]:
    """Class names from a file: one name per line (line ``i + 1`` names class ``i``; blank lines at the end
    skipped, a blank line before a name refused with its number: skipped, it shifted every name after it), a JSON
    list, or a JSON object ``{index: name}`` whose indices are ``0..K-1``. A :class:`SalienceError` names the file
    when it cannot be read or is none of these (read by :func:`salience._core.files.read_text`: a FIFO, a folder, a
    device, a file over 256 MiB or not UTF-8 refused, never waited on)."""
    import json

    p = path_arg(path, "the labels file")  # read through one checked handle: a FIFO refused, never waited on
    text = read_text(p, f"labels file {p}", "class names, one a line, or a JSON list (UTF-8)",
                     too_big="check that it is the class names' file")
    if text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SalienceError(f"labels file {p}: not valid JSON ({e})") from None
        names = _json_labels(p, data)
    else:
        names = _line_labels(p, text)
    if not names:
        raise SalienceError(f"labels file {p}: holds no class names")
    return tuple(names)


def _line_labels(p: Path, text: str) -> list[str]:
    """The names of a file of one name per line (each stripped), blank lines at its end left out; a blank line
    before a name refused, naming its line: line ``i + 1`` names class ``i``, so skipping it named every class
    after it by the next one's name, silently."""
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    blank = next((i for i, name in enumerate(names) if not name), None)
    if blank is not None:
        after = f"after class {blank - 1} ({names[blank - 1]!r})" if blank else "before class 0"
        raise SalienceError(f"labels file {p}: line {blank + 1} is blank ({after}); each line names the next class, "
                            "so a blank line would shift every name after it: remove it, or give that class a name")
    return names


def _json_labels(p: Path, data: object) -> list[str]:
    """A JSON list of names, or ``{index: name}`` covering ``0..K-1``, as a list."""
    import json

    def name(v: object) -> bool:  # a class name: a string or a number, not true / null / an object
        return isinstance(v, (str, int, float)) and not isinstance(v, bool)

    if isinstance(data, list) and all(name(v) for v in data):
        return [str(v) for v in data]
    if isinstance(data, dict):
        try:
            by_index = {int(k): str(v) for k, v in data.items()}
        except ValueError:
            raise SalienceError(f"labels file {p}: the keys of a JSON object must be class indices 0, 1, ...") from None
        bad = next((v for v in data.values() if not name(v)), None)
        if bad is not None or any(v is None for v in data.values()):
            raise SalienceError(f"labels file {p}: each class name must be a string, got {json.dumps(bad)}")
        if sorted(by_index) != list(range(len(by_index))):
            raise SalienceError(f"labels file {p}: {_index_gap(sorted(by_index))}")
        return [by_index[i] for i in range(len(by_index))]
    raise SalienceError(f"labels file {p}: expected a JSON list of names or an object {{index: name}}")


def _index_gap(indices: list[int]) -> str:
    """Why a labels file's JSON object of sorted class ``indices`` does not name the classes ``0..K-1``: the
    indices missing (the object's ``{"0": "cat", "2": "dog"}`` says nothing of class 1), or a negative one."""
    if indices[0] < 0:
        return f"the index {indices[0]} is negative; the keys are class indices 0, 1, 2, ..."
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    which = f"class {shown} has" if len(missing) == 1 else f"classes {shown} have"
    return (f"{which} no name: the object names {len(indices)} of the classes 0 to {indices[-1]}; give each of "
            "them a name")


def name_classes(info: ModelInfo, num_outputs: int,
                 labels: Optional[Sequence[str]] = None) -> tuple[ModelInfo, Optional[str]]:
    """``info`` with class names for a model of ``num_outputs`` outputs, and where they came from.

    ``labels`` (e.g. from :func:`read_labels`) name the outputs of any model and must be one per
    output; otherwise the model's own names stay, and a classifier with 1000 outputs and no names
    gets ImageNet-1k's (:func:`imagenet_class_names`, when torchvision is installed). The source is
    ``"labels"``, ``"model"``, ``"imagenet-1k"`` or ``None`` (no names).
    """
    if not isinstance(info, ModelInfo):
        raise SalienceError(f"name_classes needs the model's ModelInfo (model.salience_info), got {type(info).__name__}")
    try:  # an int, a numpy integer, a 0-d integer tensor (logits.shape[-1] is an int)
        count = None if isinstance(num_outputs, bool) else operator.index(num_outputs)
    except TypeError:
        count = None
    if count is None or count < 1:
        raise SalienceError(f"num_outputs must be the model's number of outputs, an int >= 1, got {num_outputs!r}")
    num_outputs = count
    if labels is not None:
        if hasattr(labels, "tolist") and not isinstance(labels, (str, bytes)):  # a numpy array, a pandas Series
            labels = labels.tolist()
        # names are strings, or numbers as read_labels takes them from a JSON list; not None, True or an object
        if isinstance(labels, (str, bytes, Mapping)) or not isinstance(labels, Sequence) or not all(
                isinstance(n, (str, numbers.Real)) and not isinstance(n, bool) for n in labels):
            raise SalienceError(f"labels must be a list of class names (str), one per output, got {type(labels).__name__}"
                                + (" (a str would be split into its letters)" if isinstance(labels, str) else ""))
        if len(labels) != num_outputs:
            raise SalienceError(f"{len(labels)} class name{'' if len(labels) == 1 else 's'} for a model with {num_outputs} "
                                f"output{'' if num_outputs == 1 else 's'}; "
                                f"give one name per output")
        return dataclasses.replace(info, class_names=tuple(str(n) for n in labels)), "labels"
    if info.class_names is not None:
        return info, "model"
    if num_outputs == 1000 and info.task == "classification":
        names = imagenet_class_names()
        if names is not None:
            return dataclasses.replace(info, class_names=names), "imagenet-1k"
    return info, None
