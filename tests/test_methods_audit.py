"""The Python API of the saliency methods (``salience.METHODS`` and ``salience.class_model``) over the
inputs a user passes: each call works, or raises a ``SalienceError`` saying what to do, and the user's
model comes back as it was. Each test here failed before its fix (a raw ``AttributeError`` /
``ValueError`` / ``RuntimeError``, a NaN map, or a message that named the wrong thing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

from conftest import SmallCNN, unchanged

X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
CHEAP = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 2}, "rise": {"masks": 4, "cell": 2}}
LAYER_METHODS = sorted(salience.methods.LAYER_METHODS)


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()  # train mode, as a user's model may be


def test_eigencam_from_the_registry_says_what_x_must_be():
    """``METHODS["eigencam"]`` (the adapter that takes a target) read ``x.shape`` first: a list of
    pixels was a raw "'list' object has no attribute 'shape'"; every other method says what x must be."""
    model = _cnn()
    for x, message in [(X.tolist(), r"x as a torch.Tensor of shape \(B, C, H, W\), got list"),
                       (X[0], r"add the batch dimension with x.unsqueeze\(0\)")]:
        with unchanged(model), pytest.raises(SalienceError, match=message):
            salience.METHODS["eigencam"](model, x, None)


@pytest.mark.parametrize("shape", ["x", ("3", "8", "x"), (3, 8.5, 8), (3, None, 8)])
def test_class_model_refuses_a_shape_it_cannot_read(shape):
    """``shape="x"`` was a raw "invalid literal for int()", ``(3, None, 8)`` a raw TypeError, and
    ``(3, 8.5, 8)`` was truncated to 8 rows silently."""
    model = _cnn()
    with unchanged(model), pytest.raises(SalienceError, match=r"shape must be \(C, H, W\) with positive sizes"):
        salience.class_model(model, 1, shape=shape, steps=1)


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
@pytest.mark.parametrize("target", [None, torch.tensor([1, 2])], ids=["predicted", "per-image"])
def test_many_pass_methods_run_under_inference_mode(method, target):
    """Called under ``torch.inference_mode()`` (as a user's evaluation loop may be), SmoothGrad and
    integrated gradients stopped with torch's raw "Inference tensors cannot be saved for backward":
    the class indices made there were gathered in the backward pass. Every other method ran. The
    maps equal those of a call outside it."""
    model = _cnn()
    want = salience.METHODS[method](model, X, target, **CHEAP[method])
    with unchanged(model):
        with torch.inference_mode():
            got = salience.METHODS[method](model, X, target, **CHEAP[method])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["vanilla", "gradcam"])
@pytest.mark.parametrize("make", [lambda: torch.tensor([1, 2]), lambda: salience.targets.classes([1, 2]),
                                  lambda: salience.targets.multilabel([0, 1])], ids=["tensor", "classes", "multilabel"])
def test_a_target_made_under_inference_mode(method, make):
    """Class indices made under ``torch.inference_mode()`` (a target built in a user's evaluation loop)
    stopped every gradient method with torch's raw "Inference tensors cannot be saved for backward"."""
    model = _cnn()
    want = salience.METHODS[method](model, X, make(), **CHEAP.get(method, {}))
    with torch.inference_mode():
        target = make()
    with unchanged(model):
        torch.testing.assert_close(salience.METHODS[method](model, X, target, **CHEAP.get(method, {})), want)


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "hirescam", "layercam"])
def test_a_cam_layer_after_the_targets_layer_says_what_to_do(method):
    """With a target on an inner layer (``activation("features.3", 1)``), a CAM layer that runs after it
    (the default layer ``features`` wraps it) said "layer 'features' was not called in the forward
    pass": it was called, but the pass stops at the target's layer. A layer before it works."""
    model = _cnn()
    target = salience.targets.activation("features.3", 1)
    with unchanged(model), pytest.raises(SalienceError, match=r"layer 'features' gave no output before the "
                                         r"target's layer 'features.3'.*pass a layer that runs before"):
        salience.METHODS[method](model, X, target)
    with unchanged(model):
        assert salience.METHODS[method](model, X, target, layer="features.0").shape == (2, 8, 8)


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_the_default_layer_search_names_the_callers_input(method):
    """The CAMs' default-layer search runs on the first image: a batch of the wrong channel count was
    refused as "the input of shape (1, 1, 8, 8)", a shape the user never gave."""
    model = _cnn()
    with unchanged(model), pytest.raises(SalienceError, match=r"cannot take the input of shape \(2, 1, 8, 8\)"):
        salience.METHODS[method](model, X[:, :1], None)


@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_a_baseline_tensor_with_nan_is_refused(method):
    """Occlusion took a baseline tensor with NaN pixels and gave a NaN map silently (integrated gradients
    refused it, without saying what to do)."""
    model = _cnn()
    baseline = torch.zeros(3, 8, 8)
    baseline[0, 0, 0] = float("nan")
    with unchanged(model), pytest.raises(SalienceError, match=r"^baseline contains 1 NaN or infinite value\(s\); "
                                                              r"give finite values"):
        salience.METHODS[method](model, X, None, baseline=baseline, **CHEAP.get(method, {}))


@pytest.mark.parametrize("seed", [2 ** 60, -2 ** 62, 10 ** 30])
def test_rise_takes_a_large_seed(seed):
    """``seed * 1_000_003 + i`` overflowed torch's 64-bit seed: a raw "Overflow when unpacking long long".
    The masks of a small seed are unchanged (taken modulo 2**64, as torch takes a negative seed)."""
    model = _cnn()
    with unchanged(model):
        m = salience.rise(model, X, masks=4, cell=2, seed=seed)
    assert m.shape == (2, 8, 8) and torch.isfinite(m).all()
    g = salience.methods.perturbation.rise_masks
    torch.testing.assert_close(g(0, 3, (8, 8), cell=2, seed=-1), torch.stack(
        [_mask_from(torch.Generator().manual_seed(-1_000_003 + i)) for i in range(3)]))


def _mask_from(g: torch.Generator) -> torch.Tensor:
    """RISE's mask for ``cell=2`` on 8 x 8 from generator ``g`` (rise_masks's construction, written out)."""
    grid = (torch.rand(2, 2, generator=g) < 0.5).float()
    dy, dx = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g))
    up = torch.nn.functional.interpolate(grid[None, None], size=(12, 12), mode="bilinear", align_corners=False)
    return up[0, 0, dy:dy + 8, dx:dx + 8]


@pytest.mark.parametrize("method", sorted(salience.METHODS))
def test_an_empty_list_of_targets_says_so(method):
    """``target=[]`` was refused as "expected integer class indices, got a tensor of dtype torch.float32"
    (torch.as_tensor([]) is float)."""
    model = _cnn()
    if method in salience.methods.ATTENTION_METHODS:
        pytest.skip("the attention methods refuse the CNN first")
    with unchanged(model), pytest.raises(SalienceError, match=r"got no target class \(an empty list\)"):
        salience.METHODS[method](model, X, [], **CHEAP.get(method, {}))


def test_rise_seed_message_says_what_it_is():
    """The message read "seed must be an int (an int), got None" (``seed=None`` now draws fresh masks:
    tests/test_methods_leftovers.py)."""
    with pytest.raises(SalienceError, match=r"seed must be an int \(it fixes the masks, e.g. 0; None: fresh masks\), "
                                            r"got '0'"):
        salience.rise(_cnn(), X, masks=4, cell=2, seed="0")


@pytest.mark.parametrize("call", [
    lambda m: salience.class_model(m, 1, shape=(3, 8, 8), steps=np.int64(1)),
    lambda m: salience.class_model(m, 1, shape=torch.tensor([3, 8, 8]), steps=1),
    lambda m: salience.integrated_gradients(m, X, baseline=np.float32(0.5), steps=2),
], ids=["class_model-steps-numpy", "class_model-shape-tensor", "ig-baseline-numpy"])
def test_numpy_numbers_are_taken(call):
    """The opposite error: a numpy int for ``steps`` was refused ("steps must be a positive integer, got
    np.int64(1)"), and a numpy float baseline ("got float32"), where the other options take them. (The
    shape as an int tensor worked through int(); it still does.)"""
    model = _cnn()
    with unchanged(model):
        assert torch.isfinite(call(model)).all()


@pytest.mark.parametrize("option", [{"prefix_tokens": np.int64(1)}, {"grid": (np.int64(2), np.int64(2))}],
                         ids=["prefix_tokens", "grid"])
def test_token_options_take_numpy_ints(option):
    """``prefix_tokens=np.int64(1)`` and a grid of numpy ints were refused as not ints."""
    from tiny_vit import TinyViT

    torch.manual_seed(0)
    vit = TinyViT(size=(16, 16), patch=8, classes=4).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with unchanged(vit):
        torch.testing.assert_close(salience.gradcam(vit, x, **option), salience.gradcam(vit, x))


GRADIENT_METHODS = ["vanilla", "guided_backprop", "deconvnet", "guided_gradcam", "smoothgrad", "integrated_gradients",
                    "input_x_gradient"]


@pytest.mark.parametrize("method", GRADIENT_METHODS)
@pytest.mark.parametrize("fn, message", [
    (lambda g: None, r"the grad_modifier function must return a tensor of shape \(2, 3, 8, 8\).*got NoneType"),
    (lambda g: g.sum(1), r"the grad_modifier function must return .*got shape \(2, 8, 8\)"),
], ids=["none", "reduced"])
def test_a_grad_modifier_function_must_keep_the_shape(method, fn, message):
    """A function that returned ``None`` was a raw AttributeError ("'NoneType' object has no attribute
    'dim'"); one that reduced the channels a raw error of the reduction, or (SmoothGrad) taken."""
    model = _cnn()
    with unchanged(model), pytest.raises(SalienceError, match=message):
        salience.METHODS[method](model, X, None, grad_modifier=fn, **CHEAP.get(method, {}))


@pytest.mark.parametrize("method", GRADIENT_METHODS + ["occlusion"])
def test_a_reduce_function_must_give_maps(method):
    """A reduction that returned a scalar was a raw IndexError ("Dimension out of range"), or, in
    SmoothGrad, a "map" of shape ()."""
    model = _cnn()
    with unchanged(model), pytest.raises(SalienceError, match=r"the reduce function must return a tensor of shape "
                                                              r"\(B, H, W\) = \(2, 8, 8\).*got shape \(\)"):
        salience.METHODS[method](model, X, None, reduce=lambda g: g.sum(), **CHEAP.get(method, {}))


class _NaNScores(torch.nn.Module):
    """A classifier whose scores are NaN (a log of a negative number): the perturbation methods' maps were
    NaN, silently."""

    def __init__(self):
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        return self.net(x) + torch.log(x.mean() - 10)


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _cnn()

    def forward(self, x, mask):
        return self.net(x * mask)


@pytest.mark.parametrize("method", sorted(salience.METHODS))
def test_a_model_that_needs_a_second_input_says_to_wrap_it(method):
    """A model whose forward takes a second input stopped every method with Python's raw TypeError
    "forward() missing 1 required positional argument: 'mask'"."""
    model = _TwoInputs()
    with unchanged(model), pytest.raises(SalienceError, match=r"the model's forward needs more than the image batch "
                                                              r"\(.*'mask'\).*wrap the model"):
        salience.METHODS[method](model, X, None, **CHEAP.get(method, {}))


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", "occlusion", "rise"])
def test_compile_on_a_torchscript_model_runs_eagerly(method):
    """``compile=`` on a TorchScript model (which these methods explain) stopped them with torch's raw
    "torch.compile does not support compiling torch.jit.script ... models"; like any compile that cannot
    run, it warns and runs eagerly: the maps of a call without it."""
    model = torch.jit.script(_cnn().eval())
    want = salience.METHODS[method](model, X, None, **CHEAP.get(method, {}))
    with unchanged(model), pytest.warns(UserWarning, match="compile: torch.compile does not take a TorchScript "
                                                           "model; running eagerly"):
        got = salience.METHODS[method](model, X, None, compile="eager", **CHEAP.get(method, {}))
    torch.testing.assert_close(got, want)


class _Derived(_TwoInputs):
    """A model whose forward (needing a mask) is its base class's: Python names ``_TwoInputs.forward``."""


class _Masker(torch.nn.Module):
    def forward(self, x, mask):
        return x * mask


class _CallsItWrongly(torch.nn.Module):
    """A model whose own forward calls a submodule without its second input: the model's bug."""

    def __init__(self):
        super().__init__()
        self.net, self.masker = _cnn(), _Masker()

    def forward(self, x):
        return self.net(self.masker(x))


class _Nested(torch.nn.Module):
    """A model whose forward calls a module of its own class without the mask: the model's bug too."""

    def __init__(self, inner=True):
        super().__init__()
        self.net, self.inner = _cnn(), (_Nested(False) if inner else None)

    def forward(self, x, mask=None):
        return self.net(x) if self.inner is None else self.inner(mask=x)  # the bug: x given as the mask


class _Wraps(torch.nn.Module):
    """A user's wrapper whose forward calls its ``module`` (as DataParallel names it) without the mask."""

    def __init__(self):
        super().__init__()
        self.module = _TwoInputs()

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("make", [_Derived, lambda: torch.compile(_TwoInputs(), backend="eager"),
                                  lambda: torch.nn.DataParallel(_TwoInputs()),
                                  lambda: torch.jit.script(_TwoInputs().eval())],
                         ids=["inherited-forward", "torch.compile", "DataParallel", "TorchScript"])
@pytest.mark.parametrize("method", ["vanilla", "occlusion"])
def test_a_wrapped_or_derived_model_that_needs_a_second_input(make, method):
    """The check matched the model's class name only: a forward inherited from a base class (Python's
    message names the base), a model wrapped by ``torch.compile`` or ``nn.DataParallel``, and a TorchScript
    model (torch's RuntimeError "forward() is missing value for argument 'mask'") stayed raw errors."""
    model = make()
    with unchanged(model), pytest.raises(SalienceError, match=r"the model's forward needs more than the image batch "
                                                              r"\(.*'mask'.*\).*wrap the model"):
        salience.METHODS[method](model, X, None)


@pytest.mark.parametrize("make, raw", [(_CallsItWrongly, r"_Masker.forward\(\) missing 1 required"),
                                       (_Nested, r"_Nested.forward\(\) missing 1 required"),
                                       (_Wraps, r"_TwoInputs.forward\(\) missing 1 required")],
                         ids=["submodule", "same-class-submodule", "a-wrappers-module"])
def test_a_submodule_called_wrongly_keeps_its_error(make, raw):
    """The model's own bug (its forward calls a submodule, even one of its own class, without an
    argument) propagates as Python's TypeError with its traceback: it is not "the model needs a second
    input"."""
    model = make()
    with unchanged(model), pytest.raises(TypeError, match=raw):
        salience.vanilla(model, X)


TARGET_METHODS = GRADIENT_METHODS + ["gradcam", "gradcam_plus_plus", "hirescam", "xgradcam", "layercam"]


NAN_REFUSALS = ([(m, r"scores of the perturbed images are NaN or infinite")
                 for m in ["occlusion", "rise", "scorecam", "ablationcam"]]
                + [(m, r"the target's score is NaN or infinite") for m in TARGET_METHODS])


@pytest.mark.parametrize("method, said", NAN_REFUSALS)
def test_methods_refuse_nan_scores(method, said):
    """A target's score that is NaN (a model taking a log of a negative number) gave a map of NaN silently
    in the 12 gradient methods, as in the perturbation methods (their perturbed images' scores) before their check."""
    model = _NaNScores()
    with unchanged(model), pytest.raises(SalienceError, match=said):
        salience.METHODS[method](model, X, 0, **CHEAP.get(method, {}))


class _MaskedLogProbabilities(torch.nn.Module):
    """Log-probabilities with class 3 ruled out (``-inf``): legitimate, the target is another class."""

    def __init__(self):
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        out = torch.log_softmax(self.net(x), 1)
        return out.masked_fill(torch.arange(out.shape[1]) == 3, float("-inf"))


@pytest.mark.parametrize("method", TARGET_METHODS + ["occlusion", "rise"])
def test_an_infinite_score_of_another_class_is_taken(method):
    """Only the target's scores are checked: an output whose other class is ``-inf`` explains class 0 (the
    guard against refusing too much: it passed before the check, and must still)."""
    model = _MaskedLogProbabilities()
    with unchanged(model):
        assert torch.isfinite(salience.METHODS[method](model, X, 0, **CHEAP.get(method, {}))).all()


def test_an_exported_program_that_needs_a_second_input_says_to_wrap_it():
    """``torch.export``'s module of a two-input program, passed in Python (the loader refuses its file),
    stopped every method with torch's raw ValueError "Trying to flatten user inputs with exported input
    tree spec" (its unflattened module with a raw TypeError "There is no flat args adapter specified")."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(_TwoInputs().eval(), (X, torch.ones_like(X)),
                                  dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    for method, module in [("vanilla", program.module()), ("occlusion", program.module()),
                           ("vanilla", torch.export.unflatten(program))]:
        with pytest.raises(SalienceError, match=r"the model's forward needs more than the image batch .*wrap the model"):
            salience.METHODS[method](module, X, None)


@pytest.mark.parametrize("make, needs", [(_TwoInputs, True), (_Derived, True), (_CallsItWrongly, False), (_Nested, False)],
                         ids=["two-inputs", "inherited-forward", "submodule", "same-class-submodule"])
def test_python_39s_words_for_a_missing_argument(make, needs):
    """Python 3.9 (which salience supports) says "forward() missing 1 required positional argument" without
    the class's name, which the check required: there a model that needs a second input was a raw TypeError.
    Python 3.9's words are made here from the error of this Python (the traceback is the same)."""
    from salience._core.autograd import _needs_more_inputs

    model = make()
    with pytest.raises(TypeError) as caught:
        model(X)
    e = caught.value
    e.args = (str(e).split(".forward", 1)[-1].join(["forward", ""]) if ".forward()" in str(e) else str(e),)
    assert str(e).startswith("forward() missing")
    assert _needs_more_inputs(model, e) is needs


class _ClassesOut(nn.Module):
    """A model that returns what its scores decide, not the scores: an argmax's classes, or a threshold's bools."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv, self.kind = nn.Conv2d(3, 4, 3, padding=1), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv(x).mean((2, 3))
        return s.argmax(1, keepdim=True).repeat(1, 4) if self.kind == "long" else s > 0


@pytest.mark.parametrize("kind", ["long", "bool"])
@pytest.mark.parametrize("name", ["vanilla", "gradcam", "rise", "scorecam", "occlusion", "ablationcam"])
def test_a_model_returning_classes_or_bools_says_to_return_the_scores(name, kind):
    """RISE and Score-CAM raised torch's raw 'softmax not implemented for Long', every method the raw 'argmax():
    does not support bool input', occlusion and Ablation-CAM explained an argmax's class indices silently."""
    options = {"masks": 8} if name == "rise" else {}
    with pytest.raises(SalienceError, match="floating-point scores"):
        salience.METHODS[name](_ClassesOut(kind), torch.rand(2, 3, 16, 16), **options)


@pytest.mark.parametrize("shape", [(3, 1, 1), (1, 3, 1, 1), (), (1, 1, 16)])
def test_integrated_gradients_takes_a_baseline_that_broadcasts(shape):
    """A per-channel mean ``(C, 1, 1)`` (the usual 'mean of the data' baseline), a 0-d tensor: integrated gradients
    refused what occlusion broadcasts ("does not fit x"). The map equals the one of the baseline expanded by hand,
    and completeness holds: the attributions sum to f(x) - f(baseline) (a linear model: exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2)).eval()
    x = torch.rand(2, 3, 16, 16)
    baseline = torch.rand(shape)
    got = salience.integrated_gradients(model, x, 1, baseline=baseline, steps=4, reduce=None)
    want = salience.integrated_gradients(model, x, 1, baseline=baseline.expand_as(x).clone(), steps=4, reduce=None)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(baseline.expand_as(x))[:, 1]
    torch.testing.assert_close(got.reshape(2, -1).sum(1).double(), gap.double(), rtol=1e-4, atol=1e-5)


def test_integrated_gradients_refuses_a_baseline_that_does_not_broadcast():
    with pytest.raises(SalienceError, match=r"that does: .*per-channel \(3, 1, 1\)"):
        salience.integrated_gradients(SmallCNN().eval(), torch.rand(2, 3, 16, 16), 0, baseline=torch.rand(2, 1, 1))


@pytest.mark.parametrize("method, message", [
    (salience.class_model, r"class_model makes an image for a class, it does not explain x"),
    ("vanilla", r"got str \(the function, not its name: method=salience.vanilla\)"),
])
def test_smoothgrad_of_what_is_no_map_of_x_says_what_to_give(method, message):
    """``smoothgrad(method=class_model)`` was Python's raw 'class_model() takes 2 positional arguments but 3 were
    given'; a method's name said only 'got str'."""
    with pytest.raises(SalienceError, match=message):
        salience.smoothgrad(SmallCNN().eval(), torch.rand(1, 3, 16, 16), 0, method=method, samples=2)
