"""A public method called with arguments it does not take is a SalienceError that is also a TypeError (session 56).

``salience.gradcam(model, x, layers="layer4")`` was Python's raw ``TypeError``; every public method (the
``salience.X`` functions and the :data:`salience.METHODS` entries, Eigen-CAM's adapter too) now raises an
:class:`~salience._core.errors.ArgumentError` naming the method, the keyword, the closest option and the method's
options, and the same for a positional argument missing or too many; a ``TypeError`` from inside a method is its own.
The methods stay the functions to every reader: the same signature, docstring and name, the raw function found
through ``functools.partial`` (the runs' seed rules), pickled by reference.
"""
from __future__ import annotations

import importlib
import inspect
import pickle

import pytest
import torch

import salience
from salience import SalienceError
from salience._core.engine import unbind
from salience._core.errors import ArgumentError
from salience.methods import _multi, as_method
from conftest import seeded_small_cnn, unchanged

PUBLIC = {**{name: salience.METHODS[name] for name in salience.METHODS}, "eigencam (function)": salience.eigencam,
          "class_model": salience.class_model}
"""Every public method: the registry's entries, Eigen-CAM's function (the registry holds its adapter) and
``salience.class_model``, which is not in the registry (checked since session 57: it was Python's raw ``TypeError``;
``tests/test_class_model.py::test_exported``)."""


def _name(key: str) -> str:
    return key.split(" ")[0]


def _options(fn) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _args(key: str, model, x) -> tuple:
    return (model, x)


@pytest.fixture(scope="module")
def model_x():
    return seeded_small_cnn().eval(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", [k for k in PUBLIC if k != "smoothgrad"])
def test_an_unknown_keyword_names_the_method_the_closest_option_and_the_options(key, model_x) -> None:
    """A keyword one letter off an option (``layers`` for ``layer``): an ArgumentError, caught as a TypeError too,
    naming the method, the keyword, that option and every option; nothing run, the model as it was."""
    model, x = model_x
    fn = PUBLIC[key]
    options = _options(fn)
    wrong = options[0] + "s" if not options[0].endswith("s") else options[0][:-1]
    with unchanged(model), pytest.raises(TypeError) as caught:
        fn(*_args(key, model, x), **{wrong: 1})
    e = caught.value
    assert isinstance(e, ArgumentError) and isinstance(e, SalienceError), type(e)
    message = str(e)
    assert message.startswith(f"{_name(key)} has no option {wrong!r}; did you mean {options[0]!r}?"), message
    assert message.endswith(f"its options: {', '.join(options)})"), message


def test_smoothgrad_names_an_option_neither_it_nor_its_method_takes(model_x) -> None:
    """SmoothGrad takes its method's options (``**options``), so the call binds; SmoothGrad's own check names the
    keyword, an ArgumentError as the others' (session 57; a plain SalienceError before, not a TypeError)."""
    model, x = model_x
    with pytest.raises(ArgumentError, match=r"vanilla has no option 'sample' \(nor has smoothgrad\); did you mean "
                                            r"'samples'\?"):
        salience.smoothgrad(model, x, sample=3)


@pytest.mark.parametrize("key", list(PUBLIC))
def test_a_missing_positional_argument_is_an_argument_error(key, model_x) -> None:
    """``salience.X(model)``: the argument missing, and how the method is called."""
    model, _ = model_x
    fn = PUBLIC[key]
    second = list(inspect.signature(fn).parameters)[1]
    with pytest.raises(ArgumentError, match=rf"^{_name(key)}: missing a required argument: '{second}' \(called as "
                                            rf"{_name(key)}\(model, {second}"):
        fn(model)


@pytest.mark.parametrize("key", list(PUBLIC))
def test_too_many_positional_arguments_is_an_argument_error(key, model_x) -> None:
    """An option given by position (``salience.vanilla(model, x, 1, "abs")``): the options are keywords."""
    model, x = model_x
    fn = PUBLIC[key]
    positional = [n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    args = (*_args(key, model, x), *([None] * (len(positional) - 2)), "abs")
    with unchanged(model), pytest.raises(ArgumentError, match=rf"^{_name(key)} takes {len(positional)} positional "
                                                              rf"arguments \({', '.join(positional)}\), got "
                                                              rf"{len(positional) + 1}: its options are keywords"):
        fn(*args)


def test_a_type_error_inside_a_method_is_its_own() -> None:
    """Only the call's own binding becomes an ArgumentError: a TypeError raised inside the method (a model that takes
    no tensor, a bug) comes out as it was, with its traceback."""
    def method(model, x, target=None, *, reduce="abs"):
        raise TypeError("inside")

    with pytest.raises(TypeError, match="^inside$") as caught:
        _multi.checked(method)(None, None)
    assert not isinstance(caught.value, SalienceError)
    with pytest.raises(ArgumentError, match="method has no option 'reduc'; did you mean 'reduce'"):
        _multi.checked(method)(None, None, reduc=1)


def test_eigencam_entry_names_its_options_for_the_adapter() -> None:
    """Eigen-CAM's registry entry (the adapter that takes the target) refuses a keyword as the function does."""
    model, x = seeded_small_cnn().eval(), torch.rand(1, 3, 16, 16)
    with pytest.raises(ArgumentError, match=r"^eigencam has no option 'layers'; did you mean 'layer'\?"):
        salience.METHODS["eigencam"](model, x, 1, layers="features.3")


RAW = {name: fn.__wrapped__ for name, fn in salience.METHODS.items() if name != "eigencam"}
"""The implementations under the checked functions their modules define."""


@pytest.mark.parametrize("name", sorted(RAW))
def test_a_checked_method_is_the_function_to_its_readers(name) -> None:
    """``salience.X is METHODS[X]``; the signature, docstring, name and marks are the function's; ``functools.partial``
    unbinding finds the module's function (``runs.job``'s seed rules compare it with ``salience.methods.smoothgrad``'s);
    pickle takes it by reference."""
    fn, raw = salience.METHODS[name], RAW[name]
    assert getattr(salience, name) is fn and getattr(salience.methods, name) is fn
    assert getattr(importlib.import_module(fn.__module__), name) is fn  # the module's own name is the checked function
    assert fn is not raw and unbind(fn)[0] is fn
    assert inspect.signature(fn) == inspect.signature(raw) and str(inspect.signature(fn)) == str(inspect.signature(raw))
    assert fn.__doc__ == raw.__doc__ and fn.__name__ == raw.__name__ == name and fn.__module__ == raw.__module__
    assert getattr(fn, "several_targets", False) == getattr(raw, "several_targets", False)
    assert pickle.loads(pickle.dumps(fn)) is fn
    assert type(fn).__name__ == "function" and repr(fn).split(" at ")[0] == repr(raw).split(" at ")[0]


def test_eigencam_and_smoothgrad_stay_what_they_were() -> None:
    """``salience.eigencam`` is the function (which refuses a target), its registry entry the one adapter, checked;
    the runs' seed rule finds SmoothGrad behind the registry's entry (a SmoothGrad run's images share
    its seed, 0 by default)."""
    raw = {m: getattr(importlib.import_module(f"salience.methods.{f}"), m)
           for m, f in (("eigencam", "cams"), ("smoothgrad", "smoothgrad"))}
    assert unbind(salience.eigencam)[0] is raw["eigencam"]
    assert inspect.signature(salience.eigencam) == inspect.signature(raw["eigencam"])
    assert as_method(salience.eigencam) is salience.METHODS["eigencam"] is as_method(salience.METHODS["eigencam"])
    assert list(inspect.signature(salience.METHODS["eigencam"]).parameters)[:3] == ["model", "x", "target"]
    from salience.runs.job import _run_seed
    assert unbind(salience.smoothgrad)[0] is raw["smoothgrad"] and _run_seed(salience.METHODS["smoothgrad"]) == 0
