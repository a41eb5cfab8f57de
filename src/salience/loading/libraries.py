"""Models from other libraries: ``timm:NAME`` (timm) and ``hf:DIR_OR_ID`` (Hugging Face transformers).

Nothing here downloads. timm's pretrained weights come from the local caches only (the Hugging
Face hub cache, ``HF_HUB_CACHE`` or ``HF_HOME/hub``, and torch hub's ``checkpoints`` folder,
``TORCH_HOME``; ``timm:NAME.TAG@REVISION`` for a branch, tag or commit of the hub repo
``timm/NAME.TAG``, from the hub cache only), and a transformers model from a ``save_pretrained``
folder or the local cache (``local_files_only``, ``hf:ORG/NAME@REVISION`` for a branch, tag or
commit). The cache folder is
read from the environment at each call (:func:`hub_cache`), so a variable set after
``huggingface_hub`` was imported counts too.
Preprocessing comes from the library's own record: timm's ``pretrained_cfg`` (with the
``config.json`` of the hub snapshot the weights came from over it) through
``timm.data.resolve_data_config``, transformers' image-processor config
(``preprocessor_config.json``); class names from timm's ``label_names`` or ImageNet-1k's for
1000 classes, and from transformers' ``config.id2label``.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from salience._core.errors import SalienceError, first_line, suggest, user_stacklevel
from salience._core.info import ModelInfo, attach_info
from salience.loading.models import PathLike, imagenet_class_names, load_state, read_state_dict

__all__ = ["load_timm", "load_hf", "timm_info", "hf_info", "hub_cache"]

_INTERPOLATIONS = ("bilinear", "bicubic")


def _require(package: str, spec: str):
    try:
        return __import__(package)
    except ImportError:
        raise SalienceError(f"{spec} needs the {package} package, which is not installed; pip install {package}") \
            from None


def hub_cache() -> str:
    """The Hugging Face hub cache folder as ``huggingface_hub`` defines it (``HF_HUB_CACHE``, else the
    legacy ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``,
    else ``~/.cache/huggingface/hub``), read now: ``huggingface_hub`` reads it once, at import."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    path = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(path))


# --------------------------------------------------------------------------------- timm


def load_timm(name: str, weights: Optional[PathLike] = None, trust_pickle: bool = False) -> nn.Module:
    """timm's architecture ``name`` (``"resnet50"``, ``"vit_base_patch16_224.augreg_in1k"``) with
    ``weights``: a state-dict file (``.pth`` / ``.pt`` / ``.safetensors``; another number of
    classes is read from its classifier), ``"random"``, or ``None`` for timm's pretrained
    weights from the local cache (a :class:`SalienceError` says how to get them when absent).
    ``NAME@REVISION`` (a branch, tag or commit of the hub repo ``timm/NAME.TAG``) takes the
    pretrained weights of that revision, which only the hub cache holds; it goes with no ``weights``."""
    timm = _require("timm", f"timm:{name}")
    arch, revision = _split_revision(name)
    if not arch or not timm.is_model(arch):
        raise SalienceError(f"unknown timm model {arch!r}{suggest(arch, timm.list_models())} "
                            "(see timm.list_models() for all names)")
    if revision and weights is not None:
        raise SalienceError(
            f"timm:{name}: the revision @{revision} picks timm's pretrained weights of that revision from the hub "
            f"cache, and weights {os.fspath(weights)!r} replace them: give one, timm:{arch} with weights=FILE "
            f"or timm:{name} without weights")
    if weights is None:
        model = _timm_pretrained(timm, arch, revision, trust_pickle)
    elif str(weights) == "random":
        model = timm.create_model(arch, pretrained=False)
    else:
        state = read_state_dict(weights, trust_pickle=trust_pickle)
        model = timm.create_model(arch, pretrained=False)
        classes = _classifier_outputs(model, state)
        if classes is not None and classes != getattr(model, "num_classes", classes):
            model = timm.create_model(arch, pretrained=False, num_classes=classes)
        load_state(model, state, weights, f"timm's {arch}")
    return attach_info(model.eval(), timm_info(model, f"timm:{name}"))


def _split_revision(name: str) -> tuple[str, Optional[str]]:
    """``NAME[.TAG][@REVISION]`` -> ``(NAME[.TAG], REVISION or None)``; timm's names have no ``@``."""
    arch, at, revision = name.partition("@")
    if at and (not revision or "@" in revision or revision != revision.strip()):
        raise SalienceError(f"timm:{name}: expected timm:NAME@REVISION with one revision (a branch, tag or "
                            "commit hash of the hub repo), e.g. timm:resnet50.a1_in1k@main")
    return arch, revision or None


def _classifier_outputs(model: nn.Module, state: dict) -> Optional[int]:
    """The number of classes of a state dict, read from the model's classifier's weight."""
    key = f"{model.pretrained_cfg.get('classifier') or ''}.weight"
    w = state.get(key)
    return int(w.shape[0]) if w is not None and w.dim() >= 1 else None


def _timm_pretrained(timm: Any, name: str, revision: Optional[str], trust_pickle: bool) -> nn.Module:
    """timm's ``name`` with the pretrained weights found by :func:`_timm_cached_file` and the
    ``config.json`` of the same snapshot, as ``create_model('hf-hub:timm/NAME.TAG@REV', pretrained=True)``
    would load them online."""
    model = timm.create_model(name, pretrained=False)
    spec = f"timm:{name}" + (f"@{revision}" if revision else "")
    repo = str(model.pretrained_cfg.get("hf_hub_id") or "").partition("@")[0]
    found = _timm_cached_file(model.pretrained_cfg, revision)
    if found is None:
        raise _timm_missing(spec, name, repo, revision, bool(model.pretrained_cfg.get("url")))
    path, config = found
    overlay, model_args = _snapshot_config(config, model.pretrained_cfg["architecture"], spec) if config else ({}, {})
    if revision:
        overlay["hf_hub_id"] = f"{repo}@{revision}"  # where the weights came from, in timm's own notation
    state = read_state_dict(path, trust_pickle=trust_pickle)
    try:
        # timm applies its own conversion of the checkpoint (filter_fn) to a state dict handed over.
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={**overlay, "state_dict": state},
                                  **model_args)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SalienceError(f"{spec}: the cached weights {path} do not fit timm's {name} ({first_line(e)})") from None
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps what it was handed: a second copy of the weights
    return model


def _timm_missing(spec: str, name: str, repo: str, revision: Optional[str], url: bool = False) -> SalienceError:
    """The error for pretrained weights that are not in the local caches: what to run to get them;
    for an architecture timm has no pretrained weights of (no hub repo, no URL), that there are none."""
    if not repo and not url:
        return SalienceError(f"{spec}: timm has no pretrained weights for {name} (its pretrained_cfg names no "
                             "hub repo and no URL), so there is nothing to load"
                             f"{f' at @{revision}' if revision else ''}; pass weights=FILE (a state dict) or "
                             "weights=\"random\"")
    if revision and not repo:
        return SalienceError(f"{spec}: timm's {name} has no Hugging Face hub repo (its pretrained_cfg has no "
                             f"hf_hub_id), so a revision names no weights; drop @{revision}")
    if revision:
        return SalienceError(
            f"{spec}: revision {revision} of {repo} is not in the local Hugging Face cache ({hub_cache()}){_cached(repo)}"
            f" and salience never downloads. Get it once online: hf download {repo} --revision {revision} "
            "(a branch, a tag or a full commit hash; HF_HUB_CACHE / HF_HOME say where the cache is)")
    hub = f"hf download {repo}, or " if repo else ""
    return SalienceError(
        f"{spec}: timm's pretrained weights are not in the local cache ({hub_cache()}) and salience "
        f"never downloads. Get them once online ({hub}python -c \"import timm; timm.create_model('{name}', "
        "pretrained=True)\"), or pass weights=FILE (a state dict) or weights=\"random\"")


def _cached(repo: str) -> str:
    """``"; it holds main -> 1a2b3c4d5e, v1 -> 0f75bd64fe"``: the branches and tags of ``repo`` that
    the cache holds (their commits shortened), to pick from; ``""`` when it holds none."""
    refs = Path(hub_cache()) / ("models--" + repo.replace("/", "--")) / "refs"
    names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    return f"; it holds {', '.join(f'{n} -> {(refs / n).read_text().strip()[:10]}' for n in names)}" if names else ""


def _timm_cached_file(cfg: dict, revision: Optional[str] = None) -> Optional[tuple[Path, Optional[Path]]]:
    """The cached file of timm's pretrained weights (hub cache at ``revision``, default the
    ``hf_hub_id``'s own or ``main``; without a revision then torch hub's ``checkpoints``) and the
    ``config.json`` of the same hub snapshot (``None`` outside the hub cache or when not cached),
    or ``None``. Reads the disk only: ``try_to_load_from_cache`` never opens a connection."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, pinned = str(hub_id).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors",
                                                                               "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache(),
                                           revision=revision or pinned or None)
            if isinstance(found, str) and Path(found).is_file():
                snapshot = Path(found).parents[len(Path(filename).parts) - 1]
                config = snapshot / "config.json"
                return Path(found), config if config.is_file() else None
    url = cfg.get("url")
    if url and not revision:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if p.is_file() and p.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            return p, None
    return None


_TIMM_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "label_names")
"""The ``pretrained_cfg`` entries of a hub snapshot's ``config.json`` that salience takes (the
preprocessing, the classes and their names); the architecture comes from the spec."""


def _snapshot_config(path: Path, architecture: str, spec: str) -> tuple[dict, dict]:
    """A timm hub repo's ``config.json`` read as timm's ``hf-hub:`` loading reads it (its
    ``pretrained_cfg``, the top-level ``num_classes`` and ``label_names`` over it, the legacy flat
    form too) -> ``(pretrained_cfg overlay, model_args)``; a config of another architecture is an error."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict) or not isinstance(cfg.get("pretrained_cfg", {}), dict):
            raise ValueError("not a timm model config (a JSON object with a pretrained_cfg object)")
    except (OSError, ValueError) as e:
        raise SalienceError(f"{spec}: the cached {path} is not a readable timm config ({first_line(e)}); "
                            "download the revision again") from None
    flat = "pretrained_cfg" not in cfg
    pretrained = dict(cfg if flat else cfg["pretrained_cfg"])
    if flat and "labels" in pretrained:
        pretrained["label_names"] = pretrained.pop("labels")
    for key in ("num_classes", "label_names"):
        if not flat and cfg.get(key) is not None:
            pretrained[key] = cfg[key]
    arch = cfg.get("architecture")
    if arch and arch != architecture:
        raise SalienceError(f"{spec}: the cached {path} describes timm's {arch}, not {architecture}; "
                            f"name that architecture (timm:{arch})")
    overlay = {k: pretrained[k] for k in _TIMM_CFG_KEYS if pretrained.get(k) is not None}
    for key in ("input_size", "mean", "std"):
        if key in overlay:
            overlay[key] = tuple(overlay[key])
    names = overlay.get("label_names")
    if isinstance(names, dict):  # {index: name}, as timm allows where indices have gaps
        try:
            by_index = {int(k): str(v) for k, v in names.items()}
        except ValueError:
            by_index = {}
        overlay["label_names"] = [by_index.get(i, str(i)) for i in range(max(by_index) + 1)] if by_index else None
    model_args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    return overlay, dict(model_args)


def timm_info(model: nn.Module, name: str) -> ModelInfo:
    """A timm model's preprocessing (``resolve_data_config``: input size, ``crop_pct`` -> the
    shorter side resized to, mean, std, interpolation) and class names."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    _, h, w = (int(v) for v in cfg["input_size"])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    center = cfg.get("crop_mode", "center") == "center"
    interpolation = cfg.get("interpolation", "bilinear")
    classes = int(getattr(model, "num_classes", 0) or 0)
    labels = model.pretrained_cfg.get("label_names")
    names = tuple(str(n) for n in labels) if labels and len(labels) == classes else \
        imagenet_class_names() if classes == 1000 else None
    return ModelInfo(
        name=name, input_size=(h, w), resize=math.floor(min(h, w) / crop_pct) if center else None,
        mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
        class_names=names, interpolation=interpolation if interpolation in _INTERPOLATIONS else "bilinear",
    )


# --------------------------------------------------------------------------------- Hugging Face


def load_hf(ref: str) -> nn.Module:
    """A transformers image classifier (``AutoModelForImageClassification``) from a
    ``save_pretrained`` folder or a model id in the local cache (``ORG/NAME``, or
    ``ORG/NAME@REVISION`` for a branch, tag or commit), offline, with the preprocessing of its
    image-processor config and the class names of ``config.id2label``. It returns a
    ``ModelOutput``, whose ``logits`` salience takes."""
    _require("transformers", f"hf:{ref}")
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    folder = _hf_source(ref)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, KeyError, safetensors' own error on a cut file ...
        if Path(ref).is_dir():
            raise SalienceError(f"hf:{ref}: transformers could not load an image classifier from this folder "
                                f"({first_line(e)})") from None
        repo, _, revision = ref.partition("@")
        raise SalienceError(
            f"hf:{ref}: transformers could not load an image classifier from the cached snapshot {folder} "
            f"({first_line(e)}); if a download was cut short, get it again online: hf download {repo}"
            f"{' --revision ' + revision if revision else ''}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return attach_info(model.eval(), hf_info(model, ref))


def _hf_source(ref: str) -> str:
    """``hf:`` spec -> the folder ``from_pretrained`` reads: the spec's own folder, or the snapshot
    of ``ID@REVISION`` (default ``main``) in the cache (:func:`hub_cache`), found on disk. A folder
    and not the model id goes to transformers: given an id it calls ``hf_hub_download``, which
    opens a connection even with ``local_files_only`` unless ``HF_HUB_OFFLINE`` was set before
    ``huggingface_hub`` was imported (huggingface_hub 2.4 builds its request headers first, and that
    fetches a registry from the Hub)."""
    if Path(ref).is_dir():
        return ref
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = ref.partition("@")
    try:
        config = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache(), revision=revision or None)
    except ValueError:  # not a repo id (huggingface_hub's validation)
        config = None
    if isinstance(config, str) and Path(config).is_file():
        return str(Path(config).parent)
    at = f" at revision {revision}" if revision else ""
    raise SalienceError(
        f"hf:{ref}: not a folder, and not in the local Hugging Face cache ({hub_cache()}){at}; "
        f"salience loads offline only. Save the model with save_pretrained(DIR) and pass hf:DIR, or download "
        f"it once online (hf download {repo}{' --revision ' + revision if revision else ''}; "
        "HF_HUB_CACHE / HF_HOME say where the cache is)")


def _processor_config(ref: str) -> Optional[dict]:
    """The image processor's settings (``preprocessor_config.json``), or ``None`` without one."""
    from transformers import AutoImageProcessor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoImageProcessor.from_pretrained(_hf_source(ref), local_files_only=True).to_dict()
    except Exception:  # noqa: BLE001 - a model saved without its processor
        return None


def hf_info(model: nn.Module, ref: str) -> ModelInfo:
    """A transformers model's preprocessing (size, centre crop, mean, std, resampling) and names."""
    cfg = _processor_config(ref)
    names = _id2label(model)
    if cfg is None:
        side = getattr(model.config, "image_size", None)
        size = (int(side), int(side)) if isinstance(side, int) else None
        warnings.warn(f"hf:{ref} has no image-processor config (preprocessor_config.json): images are "
                      f"resized to {size} without normalization; save the processor beside the model",
                      stacklevel=user_stacklevel())
        return ModelInfo(name=f"hf:{ref}", input_size=size, class_names=names)
    size, resize = _hf_geometry(cfg, getattr(model.config, "image_size", None))
    normalize = cfg.get("do_normalize", True)
    resample = cfg.get("resample", cfg.get("interpolation"))
    interpolation = "bicubic" if resample in (3, "bicubic", "BICUBIC") else "bilinear"
    return ModelInfo(
        name=f"hf:{ref}", input_size=size, resize=resize, class_names=names, interpolation=interpolation,
        mean=tuple(float(v) for v in cfg["image_mean"]) if normalize and cfg.get("image_mean") else None,
        std=tuple(float(v) for v in cfg["image_std"]) if normalize and cfg.get("image_std") else None,
    )


def _side(size: Any) -> tuple[Optional[tuple[int, int]], Optional[int]]:
    """A processor's ``size`` as ``((H, W) or None, shortest_edge or None)``."""
    if isinstance(size, int):
        return None, size
    if isinstance(size, dict):
        if size.get("height") and size.get("width"):
            return (int(size["height"]), int(size["width"])), None
        if size.get("shortest_edge"):
            return None, int(size["shortest_edge"])
    return None, None


def _hf_geometry(cfg: dict, image_size: Any) -> tuple[Optional[tuple[int, int]], Optional[int]]:
    """``(input_size, resize)`` of :class:`ModelInfo` from the processor's resize and crop."""
    hw, short = _side(cfg.get("size")) if cfg.get("do_resize", True) else (None, None)
    crop, _ = _side(cfg.get("crop_size")) if cfg.get("do_center_crop") else (None, None)
    if crop is not None:  # resize (a square or the shorter side), then the centre crop
        return crop, (min(hw) if hw else short or max(crop))
    if hw is not None:
        return hw, None
    if short is not None:
        pct = cfg.get("crop_pct")
        if pct and short < 384:  # ConvNeXt's processor: shorter side to short / crop_pct, then crop
            return (short, short), int(short / float(pct))
        return (short, short), short
    side = int(image_size) if isinstance(image_size, int) else None
    return ((side, side) if side else None), None


def _id2label(model: nn.Module) -> Optional[tuple[str, ...]]:
    """``config.id2label`` as names ``0..K-1``; transformers' placeholders (``LABEL_0``) are no names."""
    mapping = getattr(model.config, "id2label", None) or {}
    try:
        by_index = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        return None
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        return None
    names = tuple(by_index[i] for i in range(len(by_index)))
    if all(re.fullmatch(rf"LABEL_{i}", n) for i, n in enumerate(names)):
        return imagenet_class_names() if len(names) == 1000 else None
    return names
