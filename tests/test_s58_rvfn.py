"""Review of the public methods as real functions (``_multi.checked``, merge e410c27b): how a refused call is told
from a ``TypeError`` raised inside a method, what the user's traceback shows, what runs before a refusal, pickling.

What failed on e410c27b:

* a refused call (a keyword the method has no option for) made inside the user's ``except`` block hid the exception
  the user was handling: the ArgumentError was raised ``from None`` inside the wrapper's handler, so its context was
  Python's own TypeError for the same call, and ``__suppress_context__`` dropped it together with the user's
  exception ("During handling of the above exception" showed neither). A plain function's TypeError shows the
  user's exception; the ArgumentError now does too, and carries no TypeError of the refused call;
* ``call_problem`` of an object without a signature to read (not callable) raised ``UnboundLocalError`` (``sig``
  unset) instead of saying nothing (``None``);
* Eigen-CAM's registry entry read the input and the targets before the keyword was refused (a target for another
  batch was the error a wrong keyword got; every other method refuses the keyword first), and its refusal and a
  user's exception stood under two ``checked_call`` frames (the adapter's and the checked method's it called);
* ``typing.get_type_hints`` of Eigen-CAM's entry raised ``NameError`` (its annotations, strings, were read under
  ``_multi``'s globals).

Pinned here (held on e410c27b too): a TypeError of the user's model (or of a torch op in it) comes out as itself,
with its traceback and no context, one frame (``checked_call``) added; a TypeError raised after passes ran is not
re-read as a refused call; refused calls (unknown keyword, ``target=`` twice, a positional option, a missing
argument) run no forward pass, for every method; SmoothGrad's ``**options``; each method pickled by reference,
also by Ray's cloudpickle and in a fresh interpreter (Eigen-CAM's ``eigencam.as_method`` found there).
"""
from __future__ import annotations

import functools
import pickle
import subprocess
import sys
import traceback

import pytest
import torch
from torch import nn

import salience
from salience._core.errors import ArgumentError, SalienceError
from salience.methods import METHODS, _multi


_PASSES: dict[int, int] = {}
"""Forward passes by model id, kept off the model: the model guard puts back what a forward writes on it."""


class Counted(nn.Module):
    """A small CNN that counts its forward passes (``passes``); ``raise_at``: the pass (1-based) that raises the
    user's own ``TypeError`` (``torch_op``: from a torch op given a wrong argument, as a bug in a model would)."""

    def __init__(self, raise_at: int = 0, torch_op: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.raise_at, self.torch_op = raise_at, torch_op
        _PASSES[id(self)] = 0

    @property
    def passes(self) -> int:
        return _PASSES[id(self)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _PASSES[id(self)] += 1
        if _PASSES[id(self)] == self.raise_at:
            if self.torch_op:
                return torch.cat(x, 5)  # TypeError from torch: cat() takes a sequence
            raise TypeError("the user's own TypeError")
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


X = torch.rand(2, 3, 8, 8)


# ------------------------------------------------------------------ a refused call: context, and what it holds


def test_a_refused_call_inside_the_users_handler_keeps_the_users_exception_as_its_context() -> None:
    """As a plain function's TypeError would: "During handling of KeyError..." and no word of Python's TypeError
    for the same call (on e410c27b: context the TypeError, suppressed, the KeyError gone from the traceback)."""
    model = Counted()
    with pytest.raises(ArgumentError) as caught:
        try:
            {}["key"]
        except KeyError:
            salience.vanilla(model, X, 1, reduc="abs")
    e = caught.value
    assert isinstance(e.__context__, KeyError) and not e.__suppress_context__ and e.__cause__ is None
    shown = "".join(traceback.format_exception(e))
    assert "KeyError: 'key'" in shown and "During handling of the above exception" in shown
    assert "unexpected keyword argument" not in shown and shown.count("Traceback (most recent call last)") == 2
    assert str(e).startswith("vanilla has no option 'reduc'; did you mean 'reduce'?") and model.passes == 0


@pytest.mark.parametrize("name", ["vanilla", "smoothgrad", "eigencam", "scorecam"])
def test_a_refused_call_outside_a_handler_has_no_context(name) -> None:
    """Nothing but the ArgumentError in the traceback (on e410c27b its context was Python's TypeError, which held
    the failed call's frame), whose last frame is the checked function's ``raise``."""
    with pytest.raises(ArgumentError) as caught:
        METHODS[name](Counted(), X, 1, 5)  # an option given by position
    e = caught.value
    assert e.__context__ is None and e.__cause__ is None
    assert traceback.extract_tb(e.__traceback__)[-1].name == "checked_call"
    shown = "".join(traceback.format_exception(e))
    assert "During handling" not in shown and "direct cause" not in shown


def test_call_problem_of_what_has_no_signature_says_nothing() -> None:
    """``None``, as for a builtin without a signature (on e410c27b: ``UnboundLocalError``)."""
    assert _multi.call_problem(42, (1,), {"a": 2}) is None
    assert _multi.call_problem(lambda model, x: x, (1, 2, 3), {}) is not None


# ------------------------------------------------------------------ the user's TypeError: as it came


@pytest.mark.parametrize("name", ["vanilla", "gradcam", "smoothgrad", "integrated_gradients", "eigencam",
                                  "occlusion", "scorecam", "rise"])
@pytest.mark.parametrize("torch_op", [False, True])
def test_the_models_own_type_error_comes_out_as_itself(name, torch_op) -> None:
    """A valid call whose model raises TypeError (its own, or a torch op's): that very exception, not an
    ArgumentError, with no context, its traceback reaching the model's ``forward``."""
    model = Counted(raise_at=1, torch_op=torch_op)
    with pytest.raises(TypeError) as caught:
        METHODS[name](model, X, 1)
    e = caught.value
    assert type(e) is TypeError and not isinstance(e, SalienceError)
    assert ("cat()" in str(e)) if torch_op else (str(e) == "the user's own TypeError")
    assert e.__context__ is None and e.__cause__ is None
    frames = [f.name for f in traceback.extract_tb(e.__traceback__)]
    assert frames[-1] == "forward" and frames[1] == "checked_call"


def test_one_frame_between_the_caller_and_the_method() -> None:
    """The traceback of the user's exception: the caller, ``checked_call``, then the method's own frame."""
    def call() -> None:
        salience.vanilla(Counted(raise_at=1), X, 1)

    with pytest.raises(TypeError) as caught:
        call()
    frames = [f.name for f in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[frames.index("call"):frames.index("call") + 3] == ["call", "checked_call", "vanilla"]


@pytest.mark.parametrize("name", ["smoothgrad", "integrated_gradients", "occlusion", "rise"])
def test_a_type_error_after_passes_ran_is_not_read_as_a_refused_call(name) -> None:
    """Raised at the third pass: the user's TypeError, the two passes before it counted, no ArgumentError."""
    model = Counted(raise_at=3)
    # a pass an item: the engine's own plan may run all of a small model's items in one pass (engine.gradient_chunk_cap)
    kw = {"samples": 4, "chunk": 1} if name == "smoothgrad" else {"chunk": 1} if name == "integrated_gradients" else {}
    with pytest.raises(TypeError, match="^the user's own TypeError$") as caught:
        METHODS[name](model, X[:1], 1, **kw)
    assert not isinstance(caught.value, ArgumentError) and model.passes == 3


def test_smoothgrads_inner_method_raising_type_error_comes_out_as_itself() -> None:
    """SmoothGrad's ``method=`` of the user's that raises TypeError on its second call: not an ArgumentError."""
    calls = []

    def mine(model, x, target=None):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("mine")
        return salience.vanilla(model, x, target)

    with pytest.raises(TypeError, match="^mine$") as caught:
        salience.smoothgrad(Counted(), X[:1], 1, method=mine, samples=4, chunk=1)
    assert not isinstance(caught.value, SalienceError) and len(calls) == 2


# ------------------------------------------------------------------ refused calls run nothing


def test_the_counter_sees_the_passes_through_the_model_guard() -> None:
    """The counts below mean something: a valid call's passes are counted (the guard puts back the model's own
    attributes, so the count lives off the model)."""
    model = Counted()
    salience.vanilla(model, X, 1)
    salience.gradcam(model, X, 1)
    assert model.passes >= 2


REFUSED = {
    "unknown keyword": ((1,), {"bogus": 3}),
    "target twice": ((1,), {"target": 2}),
    "an option by position": ((1, "abs"), {}),
    "x missing": ((), {}),
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_refused_call_is_an_argument_error_before_any_pass(name, case) -> None:
    args, kwargs = REFUSED[case]
    model = Counted()
    with pytest.raises(ArgumentError) as caught:
        METHODS[name](model, *((X,) if case != "x missing" else ()), *args, **kwargs)
    assert model.passes == 0 and isinstance(caught.value, TypeError)
    said = str(caught.value)
    if case == "unknown keyword" and name == "smoothgrad":  # **options: its method's, then SmoothGrad's
        assert said.startswith("vanilla has no option 'bogus' (nor has smoothgrad)")
        return
    assert said.startswith(name) and f"called as {name}(" in said  # names the method, shows its signature
    if case == "unknown keyword":
        assert said.startswith(f"{name} has no option 'bogus'")
    if case == "target twice":
        assert "multiple values for argument 'target'" in said


def test_smoothgrads_options_refuse_a_keyword_neither_takes_before_any_pass() -> None:
    model = Counted()
    with pytest.raises(ArgumentError, match=r"^vanilla has no option 'reduc'.*\(nor has smoothgrad\)"):
        salience.smoothgrad(model, X, 1, reduc="abs")
    with pytest.raises(ArgumentError, match=r"^gradcam has no option 'bogus'"):
        salience.smoothgrad(model, X, 1, method=functools.partial(salience.gradcam), bogus=1)
    assert model.passes == 0


def test_class_model_refuses_a_positional_option_before_any_pass() -> None:
    model = Counted()
    with pytest.raises(ArgumentError, match=r"^class_model takes 2 positional arguments \(model, target\), got 3"):
        salience.class_model(model, 1, (3, 8, 8))
    assert model.passes == 0


def test_eigencams_entry_refuses_a_wrong_keyword_first_as_every_method_does() -> None:
    """``METHODS["eigencam"]`` with a keyword Eigen-CAM has no option for and a target for another batch: the
    keyword's ArgumentError, as every other method gives (Python refuses the call before anything), raised by the
    entry's own check, the only frame under the caller (on e410c27b the adapter read the input and the targets
    first: the target's SalienceError; with a valid target the inner method's ArgumentError under 5 frames)."""
    model = Counted()
    for name in ("vanilla", "eigencam"):
        with pytest.raises(ArgumentError, match=f"^{name} has no option 'bogus'") as caught:
            METHODS[name](model, X, [1, 2, 3], bogus=1)
        assert [f.name for f in traceback.extract_tb(caught.value.__traceback__)][1:] == ["checked_call"]
        assert caught.value.__context__ is None
    with pytest.raises(ArgumentError, match="^eigencam has no option 'layers'; did you mean 'layer'") as caught:
        METHODS["eigencam"](model, X, 1, layers="conv")
    assert [f.name for f in traceback.extract_tb(caught.value.__traceback__)][1:] == ["checked_call"]
    assert model.passes == 0
    assert METHODS["eigencam"](model, X, 1, layer="conv").shape == (2, 8, 8)  # an option it takes goes through


def test_the_models_type_error_through_eigencams_entry_passes_one_checked_frame() -> None:
    """The entry calls Eigen-CAM's implementation under its own check, not the checked function again (on e410c27b
    two ``checked_call`` frames stood in the user's traceback)."""
    with pytest.raises(TypeError, match="^the user's own TypeError$") as caught:
        METHODS["eigencam"](Counted(raise_at=1), X, 1)
    frames = [f.name for f in traceback.extract_tb(caught.value.__traceback__)]
    assert frames.count("checked_call") == 1 and frames[-1] == "forward"


@pytest.mark.parametrize("name", sorted({**METHODS, "class_model": None}))
def test_type_hints_of_every_public_method_resolve(name) -> None:
    """``typing.get_type_hints`` (IDEs, documentation tools) of each method as a real function resolves; Eigen-CAM's
    entry's were strings read under ``_multi``'s globals (``NameError: LayerSpec`` on e410c27b)."""
    import typing

    fn = salience.class_model if name == "class_model" else METHODS[name]
    hints = typing.get_type_hints(fn)
    assert hints["model"] is nn.Module and "return" in hints
    if name == "eigencam":
        assert hints["target"] is typing.Any and "layer" in hints and hints["x"] is torch.Tensor


# ------------------------------------------------------------------ pickled by reference, everywhere


def test_every_method_pickles_by_reference_in_ray_cloudpickle() -> None:
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    for name, fn in {**METHODS, "class_model": salience.class_model, "eigencam (function)": salience.eigencam}.items():
        data = cloudpickle.dumps(fn)
        assert cloudpickle.loads(data) is fn, name
        assert len(data) < 120 and b"salience.methods." in data, (name, len(data))


def test_every_method_unpickles_in_a_fresh_interpreter_as_the_public_method() -> None:
    """The pickles name modules only (``salience.methods.cams`` and ``eigencam.as_method`` for Eigen-CAM's entry):
    a fresh interpreter that imported nothing finds each, and it is that interpreter's public method."""
    data = pickle.dumps({name: METHODS[name] for name in METHODS})
    code = ("import pickle, sys; fns = pickle.loads(sys.stdin.buffer.read()); import salience; "
            "assert all(fns[n] is salience.METHODS[n] for n in salience.METHODS), fns; "
            "print(fns['eigencam'].__qualname__, fns['eigencam'].adapts is salience.eigencam)")
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(
                             salience.__file__).parents[1])})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["eigencam.as_method", "True"]
