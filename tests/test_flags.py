"""Every boolean option of the public functions takes True or False (numpy's bools too) and refuses
anything else with a SalienceError naming the option: a string such as ``"False"`` or ``"no"`` is
truthy, an int 2 too, so taking them silently did the opposite of what was meant (or, for
``trust_pickle="no"``, unpickled a file the user had not trusted)."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import numpy as np
import pytest
import torch

import salience
from salience import SalienceError, evidence
from salience.compat import keras_vis as kv
from salience.render import viz

from conftest import SmallCNN
from tiny_vit import TinyViT


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def _vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT()


X = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
XV = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1))
MAPS = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(2))
MASKS = MAPS > 0.5
CHEAP = {"smoothgrad": dict(samples=2), "integrated_gradients": dict(steps=2), "rise": dict(masks=4, cell=2),
         "occlusion": dict(window=4)}


def _method(name: str) -> Callable[[str, Any], Any]:
    def call(flag: str, v: Any) -> Any:
        fn = getattr(salience, name)
        if name in salience.methods.ATTENTION_METHODS:
            return fn(_vit(), XV, 0, **{flag: v})
        if name == "eigencam":
            return fn(_cnn(), X, **{flag: v})
        return fn(_cnn(), X, 0, **CHEAP.get(name, {}), **{flag: v})
    return call


def _pickle_file(tmp: Any) -> str:
    p = tmp / "sd.pt"
    torch.save({"w": torch.zeros(1)}, p)
    return str(p)


_IMG = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
_MAP = np.random.default_rng(1).random((8, 8)).astype(np.float32)

# (module, function or class, flag) -> a call with the flag set to a value (the other arguments small).
CALLS: dict[tuple[str, str, str], Callable[[str, Any], Any]] = {}
for _name, _fn in salience.METHODS.items():
    _raw = getattr(salience.methods, _name)
    for _p in inspect.signature(_raw).parameters.values():
        if _p.annotation == "bool":
            CALLS[(_raw.__module__, _raw.__name__, _p.name)] = _method(_name)
CALLS.update({
    ("salience.evidence.localization", "energy_in_mask", "absolute"):
        lambda f, v: evidence.energy_in_mask(MAPS, MASKS, **{f: v}),
    ("salience.evidence.localization", "saliency_box", "largest"): lambda f, v: evidence.saliency_box(MAPS, **{f: v}),
    ("salience.evidence.localization", "weak_localization", "largest"):
        lambda f, v: evidence.weak_localization(MAPS, MASKS, **{f: v}),
    ("salience.methods.class_model", "class_model", "progress"):
        lambda f, v: salience.class_model(_cnn(), 0, shape=(3, 8, 8), steps=1, **{f: v}),
    ("salience.methods.class_model", "class_model", "return_history"):
        lambda f, v: salience.class_model(_cnn(), 0, shape=(3, 8, 8), steps=1, **{f: v}),
    ("salience.render.viz", "figure", "overlay"): lambda f, v: viz.figure([_IMG], {"m": [_MAP]}, **{f: v}),
    ("salience.render.viz", "figure", "labels"): lambda f, v: viz.figure([_IMG], {"m": [_MAP]}, **{f: v}),
    ("salience.render.viz", "figure", "signed"): lambda f, v: viz.figure([_IMG], {"m": [_MAP]}, **{f: v}),
    ("salience.render.viz", "scale", "signed"): lambda f, v: viz.scale(_MAP, **{f: v}),
    ("salience.render.viz", "heatmap", "signed"): lambda f, v: viz.heatmap(_MAP, **{f: v}),
    ("salience.render.viz", "colored", "signed"): lambda f, v: viz.colored(np.stack([_MAP] * 3), **{f: v}),
    ("salience.render.viz", "overlay", "signed"): lambda f, v: viz.overlay(_IMG, _MAP, **{f: v}),
    ("salience.compat.keras_vis", "visualize_saliency", "keepdims"):
        lambda f, v: kv.visualize_saliency(_cnn(), -1, 0, X[0], **{f: v}),
    ("salience.compat.keras_vis", "visualize_saliency_with_losses", "keepdims"):
        lambda f, v: kv.visualize_saliency_with_losses(_cnn(), [(kv.ActivationMaximization("head", 0), 1.0)], X[0],
                                                        **{f: v}),
    ("salience.targets", "resolve", "strip_softmax"):
        lambda f, v: salience.targets.resolve([salience.targets.as_target(None)], _cnn(), X, **{f: v}),
    ("salience.attention", "AttentionCapture", "grads"): lambda f, v: salience.attention.AttentionCapture(**{f: v}),
    ("salience.demo.zoo", "ShapesViT", "stem"): lambda f, v: salience.zoo.ShapesViT(depth=1, **{f: v}),
    ("salience._core.tensors", "check_input_pixels", "resize"):
        lambda f, v: salience.loading.check_input_pixels([8], "size", **{f: v}),
})
_TRUST = {("salience.loading.models", "load_model", "trust_pickle"), ("salience.loading.models", "read_state_dict",
                                                                        "trust_pickle")}
NONE_ALLOWED = {k for k in CALLS if k[2] == "signed"}  # None: from the map's values (documented)
# Not flags of their own: ``compile`` takes a backend name or a function too (checked by the run's options).
NOT_FLAGS = {"compile"}


def _public_flags() -> set[tuple[str, str, str]]:
    """Every (module, function, parameter) of the public surface annotated as a bool."""
    found = set()
    for mn in ("salience", "salience.methods", "salience.evidence", "salience.render.viz", "salience.render.plots",
               "salience.render.report", "salience.reduce", "salience.compat.keras_vis", "salience.loading",
               "salience.targets", "salience.demo.data", "salience.demo.zoo", "salience.attention", "salience.rules"):
        m = importlib.import_module(mn)
        for name in getattr(m, "__all__", []):
            f = getattr(m, name, None)
            mod = getattr(f, "__module__", "") or ""
            if not callable(f) or mod.startswith(("salience.runs", "salience.explore")):
                continue
            try:
                sig = inspect.signature(f)
            except (TypeError, ValueError):
                continue
            for p in sig.parameters.values():
                if "bool" in str(p.annotation) and p.name not in NOT_FLAGS:
                    found.add((mod, f.__name__, p.name))
    return found


def test_every_public_flag_is_covered():
    """The table below holds every bool option of the public surface: a new one must be added."""
    assert _public_flags() - set(CALLS) - _TRUST == set()


@pytest.mark.parametrize("key", sorted(CALLS), ids=lambda k: f"{k[1]}.{k[2]}")
def test_a_flag_refuses_what_is_not_a_bool(key):
    call = CALLS[key]
    bad = ["no", "False", 2] + ([] if key in NONE_ALLOWED else [None])
    for v in bad:
        with pytest.raises(SalienceError, match=rf"{key[2]} must be True or False.*got {v!r}"):
            call(key[2], v)


@pytest.mark.parametrize("key", sorted(CALLS), ids=lambda k: f"{k[1]}.{k[2]}")
def test_a_flag_takes_true_false_and_numpys_bools(key):
    call = CALLS[key]
    for v in (True, False, np.bool_(True)):
        call(key[2], v)


@pytest.mark.parametrize("fn", ["load_model", "read_state_dict"])
def test_trust_pickle_is_a_flag(fn, tmp_path):
    """``trust_pickle="no"`` unpickled the file (a truthy string): it is refused before the file is read."""
    path = _pickle_file(tmp_path)
    for v in ("no", 1, None):
        with pytest.raises(SalienceError, match=rf"trust_pickle must be True or False.*got {v!r}"):
            getattr(salience.loading, fn)(path, trust_pickle=v)
