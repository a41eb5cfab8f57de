"""The public methods are real Python functions (session 58): ``salience.vanilla``, every ``METHODS`` entry (Eigen-CAM's
adapter too), ``salience.eigencam`` and ``salience.class_model`` are ``types.FunctionType`` objects made by
``salience.methods._multi.checked`` where each module defines its method, keeping what the ``functools.partial``
wrapper (``Checked``) gave: the same ArgumentError messages, one object under every name, pickling by reference.

What failed on the base (02bd6ba2), where each was a ``Checked`` partial whose class said ``function``:

* ``inspect.isfunction(salience.vanilla)`` was False and ``type(fn) is types.FunctionType`` did not hold;
* ``inspect.getfile`` / ``inspect.getsourcefile`` / ``inspect.getsourcelines`` of ``fn`` raised ``TypeError`` ("got
  function"), and ``inspect.getmodule`` was ``None``, so ``help()`` did not say which module holds the method;
* a method had no ``__globals__`` (doctest's finder, IDEs' "go to definition") nor ``__code__``;
* the module's own name (``salience.methods.vanilla.vanilla``) was the unchecked function, a second object: a call
  through it refused no keyword with the ArgumentError, and ``unbind`` of a partial of ``salience.smoothgrad`` gave
  that other object, not the public method;
* ``help()``'s header said "function in module ..." without the method's name;
* a pickle was a call (``checked(<the module's function>)``, a REDUCE at load), 1,976 bytes over the 20 methods the
  s57 review counted (1,966 then); a function's pickle is the reference alone (1,126 bytes now).

Kept (these held on the base too): two calls per call (one of the wrapper, one of the method: what its 0.3 us is),
the runs' seed rules through ``functools.partial``, an inner method's ArgumentError left as it is.
"""
from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import pickle
import pickletools
import pydoc
import sys
import types

import pytest
import torch

import salience
from salience._core.engine import unbind
from salience._core.errors import ArgumentError
from salience.methods import _multi
from conftest import seeded_small_cnn

PUBLIC = {**salience.METHODS, "eigencam (function)": salience.eigencam, "class_model": salience.class_model}
"""Every public method: the registry's entries, Eigen-CAM's function (no target) and ``salience.class_model``."""


def _home(fn) -> types.ModuleType:
    """The module that defines ``fn``'s implementation."""
    return importlib.import_module(fn.__module__)


def _by_name(fn):
    """What ``fn``'s module and qualified name find: what pickle (and cloudpickle) give back for it."""
    found = _home(fn)
    for part in fn.__qualname__.split("."):
        found = getattr(found, part)
    return found


@pytest.mark.parametrize("key", sorted(PUBLIC))
def test_every_public_method_is_a_real_function(key) -> None:
    fn = PUBLIC[key]
    assert type(fn) is types.FunctionType and inspect.isfunction(fn) and _multi.is_checked(fn)
    assert isinstance(fn.__code__, types.CodeType) and isinstance(fn.__globals__, dict)


@pytest.mark.parametrize("key", sorted(PUBLIC))
def test_inspect_finds_its_file_source_and_module(key) -> None:
    """``getfile`` does not raise; ``getsource`` / ``getsourcelines`` give the implementation's source (through
    ``__wrapped__``), in the file of the module ``__module__`` names; ``getmodule`` is that module."""
    fn = PUBLIC[key]
    assert inspect.getfile(fn).endswith(".py")
    impl = inspect.unwrap(fn)
    lines, start = inspect.getsourcelines(fn)
    assert (lines, start) == inspect.getsourcelines(impl) and start > 0
    assert "def " in lines[0] or lines[0].lstrip().startswith("@")
    if key != "eigencam":  # the adapter's implementation is as_method's closure, in _multi.py
        assert inspect.getsourcefile(impl) == _home(fn).__file__
        assert f"def {fn.__name__}(" in inspect.getsource(fn)
    assert inspect.getmodule(fn) is _home(fn)


@pytest.mark.parametrize("key", sorted(PUBLIC))
def test_the_modules_own_name_is_the_checked_function(key) -> None:
    """``salience.methods.vanilla.vanilla is salience.vanilla`` (Eigen-CAM's entry: ``...cams.eigencam.as_method``):
    one object under every name, which pickle and cloudpickle find by name and give back itself, in every protocol."""
    fn = PUBLIC[key]
    assert _by_name(fn) is fn
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(fn, protocol=protocol)) is fn
    cloudpickle = pytest.importorskip("cloudpickle")
    data = cloudpickle.dumps(fn)
    assert pickle.loads(data) is fn and len(data) < 200, len(data)


def test_the_modules_name_refuses_an_unknown_keyword() -> None:
    """The name a user may import from the method's module checks the call as ``salience.gradcam`` does."""
    from salience.methods.gradcam import gradcam

    model, x = seeded_small_cnn().eval(), torch.rand(1, 3, 16, 16)
    with pytest.raises(ArgumentError, match=r"^gradcam has no option 'layers'; did you mean 'layer'\?"):
        gradcam(model, x, 1, layers="features.3")


def test_eigencam_entry_is_the_functions_as_method() -> None:
    entry = salience.METHODS["eigencam"]
    assert entry is salience.eigencam.as_method is _multi.as_method(salience.eigencam) is _multi.as_method(entry)
    assert entry.__qualname__ == "eigencam.as_method" and entry.__name__ == "eigencam"
    assert entry.adapts is salience.eigencam and entry.__module__ == salience.eigencam.__module__


def test_pickles_are_references_and_stay_small() -> None:
    """By reference: each pickle names the module and the qualified name and nothing else (no call at load), none
    carries a docstring, and the 20 methods the s57 review counted (1,966 bytes then) take no more."""
    counted = {k: fn for k, fn in PUBLIC.items() if k != "class_model"}
    sizes = {k: len(pickle.dumps(fn)) for k, fn in counted.items()}
    assert len(sizes) == 20 and sum(sizes.values()) <= 1966, sizes
    for fn in PUBLIC.values():
        data = pickle.dumps(fn)
        ops = {op.name for op, _, _ in pickletools.genops(data)}
        assert "STACK_GLOBAL" in ops and not ops & {"REDUCE", "BUILD", "NEWOBJ"}, ops
        assert b"Grad-CAM" not in data


@pytest.mark.parametrize("key", ["vanilla", "gradcam", "smoothgrad", "class_model", "eigencam (function)"])
def test_help_names_the_function_and_its_module(key) -> None:
    """``help()``'s header: a function in the method's module; the signature is the implementation's."""
    fn = PUBLIC[key]
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext).splitlines()
    assert text[0] == f"Python Library Documentation: function {fn.__name__} in module {fn.__module__}", text[0]
    assert f"{fn.__name__}{inspect.signature(fn.__wrapped__)}" in text


def test_doctest_finds_the_methods_in_their_modules() -> None:
    """Doctest's finder takes a function as its module's when its globals are the module's: the checked functions
    run under their implementation's globals, so each module's finder finds its method (itself, by name)."""
    finder = doctest.DocTestFinder(exclude_empty=False)
    for key, fn in PUBLIC.items():
        if key == "eigencam":
            continue
        module = _home(fn)
        assert fn.__globals__ is vars(module)
        names = {t.name for t in finder.find(module)}
        assert f"{module.__name__}.{fn.__name__}" in names, key


def _calls(fn, *args, **kwargs) -> int:
    seen = []
    sys.setprofile(lambda frame, event, arg: seen.append(event) if event in ("call", "c_call") else None)
    try:
        fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return len(seen) - 1  # the setprofile(None) call


def test_a_call_costs_one_call_more() -> None:
    """What a call pays: the wrapper's frame and the method's (``sys.setprofile`` events; load does not change them),
    as the ``Checked`` partial did; a refused call reads the signature only then."""
    def noop(model, x, target=None, *, reduce="max_abs"):
        return x

    assert _calls(noop, None, 1, reduce="abs") == 1
    assert _calls(_multi.checked(noop), None, 1, reduce="abs") == 2


def test_a_wrong_call_through_a_method_inside_another_names_the_inner_one() -> None:
    """A method that calls a checked method: the inner ArgumentError comes out as it is (it is a SalienceError), not
    renamed after the outer function's signature."""
    def outer(model, x, target=None):
        return salience.vanilla(model, x, target, reduc="abs")

    model, x = seeded_small_cnn().eval(), torch.rand(1, 3, 16, 16)
    with pytest.raises(ArgumentError, match=r"^vanilla has no option 'reduc'; did you mean 'reduce'"):
        _multi.checked(outer)(model, x)


def test_seed_rules_find_smoothgrad_and_rise_through_partials() -> None:
    """The runs' seed rules unbind ``functools.partial`` and compare with the module's function: it is the public
    method itself."""
    from salience.runs.job import _mask_seed, _run_seed

    assert _run_seed(functools.partial(salience.smoothgrad, seed=3)) == 3 and _run_seed(salience.smoothgrad) == 0
    assert _run_seed(functools.partial(salience.METHODS["smoothgrad"], seed=None), 7) == 7
    assert _mask_seed(functools.partial(salience.rise, seed=None), 5) == 5 and _mask_seed(salience.rise, 5) is None
    assert unbind(functools.partial(salience.smoothgrad, samples=2)) == (salience.smoothgrad, {"samples": 2})
