"""Review of session 56's checked public methods (``salience._core.errors.ArgumentError``, ``_multi.Checked``).

What failed on the base commit (30e60efd) and is fixed here:

* ``salience.smoothgrad(model, x, sample=3)`` (a keyword neither SmoothGrad nor its method takes) was a plain
  ``SalienceError``, not the ``ArgumentError`` (and ``TypeError``) of every other method, and named neither the
  method's options nor SmoothGrad's;
* a keyword bound to SmoothGrad's method by ``functools.partial`` that the method does not take
  (``method=functools.partial(my_vanilla, reduc="abs")``) was Python's raw ``TypeError`` from deep inside the
  engine, after the model had run; one a SmoothGrad inside a SmoothGrad hands its method was refused only after the
  outer one's first pass;
* the same bound keyword in a dataset run's ``methods`` was the method's error at the first image, after the run
  folder was made: the corrected command was then refused as "a run of a different command";
* ``salience.class_model(model, 0, step=3)`` was Python's raw ``TypeError`` (not checked);
* ``help(salience.gradcam)`` showed no signature (``gradcam = <function gradcam>``): a ``functools.partial`` is no
  routine to ``inspect`` / ``pydoc``; and, stored as a class attribute, a public method no longer bound as the
  function does;
* ``pickle`` (Ray runs, forkserver workers) and ``copy`` gave a new object, not the public method (a function
  pickles by reference: ``loads(dumps(salience.vanilla)) is salience.vanilla``), and carried the docstring (1.3 kB
  for 51 bytes); Eigen-CAM's registry entry did not pickle at all.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import pickle
import pydoc

import pytest
import torch

import salience
from salience import SalienceError
from salience._core.engine import unbind
from salience._core.errors import ArgumentError
from salience.methods import _multi
from conftest import seeded_small_cnn, unchanged

RAW_CLASS_MODEL = importlib.import_module("salience.methods.class_model").class_model.__wrapped__  # unchecked
PUBLIC = {**salience.METHODS, "eigencam (function)": salience.eigencam, "class_model": salience.class_model}
"""Every public method: the registry's entries, Eigen-CAM's function and ``salience.class_model``."""


@pytest.fixture(scope="module")
def model_x():
    return seeded_small_cnn().eval(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class _Forwards:
    """Counts the model's forward passes (a hook of the test's, removed at the end)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n, self.model = 0, model

    def __enter__(self) -> "_Forwards":
        self.handle = self.model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _options(fn) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


# ------------------------------------------------------------------------------------ SmoothGrad (open end A)

@pytest.mark.parametrize("inner, wrong, close", [
    (None, "sample", "samples"),              # a typo of SmoothGrad's own option
    ("gradcam", "layers", "layer"),           # a typo of its method's
    ("integrated_gradients", "step", "steps"),
])
def test_smoothgrad_unknown_keyword_is_an_argument_error_naming_both_options(model_x, inner, wrong, close) -> None:
    """An ArgumentError (SalienceError and TypeError) naming the closest option, the method's options and
    SmoothGrad's; nothing run, the model as it was."""
    model, x = model_x
    method = salience.METHODS[inner] if inner else salience.vanilla
    name = inner or "vanilla"
    with _Forwards(model) as seen, unchanged(model), pytest.raises(TypeError) as caught:
        salience.smoothgrad(model, x, samples=2, method=method, **{wrong: 3})
    e = caught.value
    assert isinstance(e, ArgumentError) and isinstance(e, SalienceError), type(e)
    msg = str(e)
    assert msg.startswith(f"{name} has no option {wrong!r} (nor has smoothgrad); did you mean {close!r}?"), msg
    assert f"{name}'s options: {', '.join(_options(method))};" in msg, msg
    assert msg.endswith(f"smoothgrad's: {', '.join(_options(salience.smoothgrad))})"), msg
    assert seen.n == 0


def test_smoothgrad_setting_given_as_keyword_is_an_argument_error(model_x) -> None:
    """``chunks=`` (a setting of how passes run): the same class of error, still saying how to set it."""
    model, x = model_x
    with pytest.raises(ArgumentError, match=r"chunks is a setting of how the passes run"):
        salience.smoothgrad(model, x, samples=2, chunks=2)


def test_smoothgrad_keyword_bound_to_its_method_that_the_method_does_not_take(model_x) -> None:
    """``method=functools.partial(fn, reduc="abs")`` of a function of the user's (not checked): refused before any
    pass, naming the method's options; it was Python's raw TypeError from inside the engine, after passes."""
    model, x = model_x
    raw_vanilla = salience.vanilla.__wrapped__

    def mine(model, x, target=None, *, reduce="max_abs", scale=1.0):
        return scale * raw_vanilla(model, x, target, reduce=reduce)

    for bound in (functools.partial(mine, reduc="abs"), functools.partial(salience.vanilla, reduc="abs")):
        with _Forwards(model) as seen, unchanged(model), pytest.raises(ArgumentError) as caught:
            salience.smoothgrad(model, x, samples=2, method=bound)
        name = "mine" if bound.func is mine else "vanilla"
        assert str(caught.value).startswith(f"{name} has no option 'reduc' (bound to it by functools.partial); "
                                            f"did you mean 'reduce'?"), caught.value
        assert seen.n == 0
    # what the method takes, bound so, still runs and equals the call with the keyword
    torch.testing.assert_close(salience.smoothgrad(model, x, samples=2, method=functools.partial(mine, scale=2.0)),
                               salience.smoothgrad(model, x, samples=2, method=mine, scale=2.0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ class_model (open end B)

def test_class_model_keyword_and_positional_errors(model_x) -> None:
    model, _ = model_x
    with unchanged(model), pytest.raises(TypeError) as caught:
        salience.class_model(model, 0, step=3)
    assert isinstance(caught.value, ArgumentError), type(caught.value)
    msg = str(caught.value)
    assert msg.startswith("class_model has no option 'step'; did you mean 'steps'? (called as "
                          "class_model(model, target, *, options); its options: shape, steps,"), msg
    with pytest.raises(ArgumentError, match=r"^class_model: missing a required argument: 'target'"):
        salience.class_model(model)
    with pytest.raises(ArgumentError, match=r"^class_model takes 2 positional arguments \(model, target\), got 3"):
        salience.class_model(model, 0, (3, 16, 16))


def test_class_model_is_the_checked_function(model_x) -> None:
    """The function to its readers, not a registry method; it computes what the module's function computes."""
    fn = salience.class_model
    assert fn is salience.methods.class_model and "class_model" not in salience.METHODS
    assert _multi.is_checked(fn) and inspect.isfunction(fn)
    assert unbind(fn)[0] is fn and fn.__wrapped__ is RAW_CLASS_MODEL
    assert inspect.signature(fn) == inspect.signature(RAW_CLASS_MODEL) and fn.__doc__ == RAW_CLASS_MODEL.__doc__
    model, _ = model_x
    kw = dict(shape=(3, 8, 8), steps=3, generator=torch.Generator().manual_seed(0))
    want = RAW_CLASS_MODEL(model, 1, **{**kw, "generator": torch.Generator().manual_seed(0)})
    torch.testing.assert_close(fn(model, 1, **kw), want, rtol=0, atol=0)
    with pytest.raises(SalienceError, match="method=class_model makes an image"):
        salience.smoothgrad(model, torch.rand(1, 3, 8, 8), method=fn)


# ------------------------------------------------------------------------------------ readers of the function

@pytest.mark.parametrize("key", sorted(PUBLIC))
def test_help_shows_the_signature_and_it_is_a_routine(key) -> None:
    """``help(salience.gradcam)`` shows ``gradcam(model, x, target=None, *, layer=...)`` as for the function (it
    showed ``gradcam = <function gradcam>`` and no signature); ``inspect.isroutine`` holds."""
    fn = PUBLIC[key]
    raw = fn.__wrapped__
    assert inspect.isroutine(fn)
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    shown = f"{fn.__name__}{inspect.signature(fn)}"
    assert shown in text.splitlines(), text[:400]
    if raw.__name__ == fn.__name__:  # not Eigen-CAM's adapter (its own function)
        assert shown == f"{raw.__name__}{inspect.signature(raw)}"


def test_a_public_method_held_by_a_class_binds_as_the_function_does(model_x) -> None:
    """A class attribute: the function's descriptor behaviour (bound to the instance, the same on the class)."""
    raw = salience.vanilla.__wrapped__

    class Held:
        checked = salience.vanilla
        plain = raw

    assert Held.checked is salience.vanilla and Held.plain is raw
    assert Held().checked.__func__ is salience.vanilla and Held().plain.__func__ is raw
    model, x = model_x

    class Explainer:
        method = staticmethod(salience.vanilla)

    torch.testing.assert_close(Explainer().method(model, x), raw(model, x))


@pytest.mark.parametrize("key", sorted(PUBLIC))
def test_pickle_and_copy_give_the_public_method_itself(key) -> None:
    """By reference, as a function pickles: the same object back, a short pickle without the docstring."""
    fn = PUBLIC[key]
    data = pickle.dumps(fn)
    assert pickle.loads(data) is fn
    assert copy.copy(fn) is fn and copy.deepcopy(fn) is fn
    assert len(data) < 200 and b"Grad-CAM" not in data, len(data)
    bound = functools.partial(fn, seed=0) if "seed" in inspect.signature(fn).parameters else functools.partial(fn)
    back = pickle.loads(pickle.dumps(bound))
    assert back.func is fn and back.keywords == bound.keywords


def test_cloudpickle_gives_the_public_method_itself() -> None:
    """Ray's pickler (cloudpickle) too."""
    cloudpickle = pytest.importorskip("cloudpickle")
    for fn in (salience.vanilla, salience.METHODS["eigencam"], salience.class_model):
        assert pickle.loads(cloudpickle.dumps(fn)) is fn


def test_checked_twice_is_one_object() -> None:
    """``checked`` of a function gives one object however often asked (what pickle's identity rests on)."""
    raw = salience.gradcam.__wrapped__
    assert _multi.checked(raw) is salience.gradcam is _multi.checked(salience.gradcam)


# ------------------------------------------------------------------------------------ dataset runs

@pytest.mark.parametrize("checked", [True, False], ids=["public-method", "users-function"])
def test_dataset_run_refuses_a_bound_keyword_before_making_the_run_folder(tmp_path, checked) -> None:
    """``methods={"mine": functools.partial(salience.vanilla, reduc="abs")}``: an ArgumentError naming the method's
    options before the run folder is made. It was the method's TypeError at the first image, after ``run.json`` was
    written, and the corrected command was then refused as "a run of a different command" (overwrite=True needed)."""
    model = seeded_small_cnn().eval()
    images = torch.utils.data.TensorDataset(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    fn = salience.vanilla if checked else salience.vanilla.__wrapped__
    out = tmp_path / "run"
    with unchanged(model), pytest.raises(ArgumentError) as caught:
        salience.explain_dataset(model, images, {"mine": functools.partial(fn, reduc="abs")}, out, workers=0)
    assert str(caught.value).startswith("methods['mine']: vanilla has no option 'reduc' (bound to it by "
                                        "functools.partial); did you mean 'reduce'? (vanilla's options: reduce, "
                                        "grad_modifier, strip_softmax)"), caught.value
    assert not out.exists()
    salience.explain_dataset(model, images, {"mine": functools.partial(fn, reduce="abs")}, out, workers=0)
    assert out.exists()


@pytest.mark.parametrize("where", ["given", "bound"])
def test_smoothgrad_of_smoothgrad_refuses_an_inner_keyword_before_any_pass(model_x, where) -> None:
    """A SmoothGrad inside a SmoothGrad hands its method what it does not take: a keyword that method does not take
    either is refused before any pass (the inner SmoothGrad's check ran after the outer one's first pass)."""
    model, x = model_x
    inner = dict(method=salience.gradcam, samples=2)
    given = {"layers": "features"}
    method = functools.partial(salience.smoothgrad, **inner, **(given if where == "bound" else {}))
    with _Forwards(model) as seen, unchanged(model), pytest.raises(ArgumentError) as caught:
        salience.smoothgrad(model, x, samples=2, method=method, **(given if where == "given" else {}))
    assert str(caught.value).startswith("gradcam has no option 'layers' (nor has smoothgrad); did you mean 'layer'?")
    assert seen.n == 0
    layer = salience.smoothgrad(model, x, samples=2, method=functools.partial(salience.smoothgrad, **inner),
                                layer="features.3", seed=1)
    assert layer.shape == (1, 16, 16)
