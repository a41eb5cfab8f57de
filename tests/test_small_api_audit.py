"""The small public surfaces of salience over the inputs a user passes: ``salience.targets``,
``salience.reduce`` and ``salience.normalize``, ``salience.rules`` (through the guided methods),
``salience.set_performance`` / ``salience.performance``, ``salience.attention``, and the ``METHODS``
entries. Each call works, or raises a ``SalienceError`` saying what to do, and the user's model comes
back as it was. Each test here failed before its fix (a raw ``TypeError`` / ``RuntimeError`` /
``AttributeError`` / ``IndexError``, a value silently truncated or taken, an option silently ignored,
a NaN map)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, targets
from salience import reduce as R
from salience._core import perf

from conftest import SmallCNN, unchanged


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


X = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- targets

@pytest.mark.parametrize("make, message", [
    (lambda: targets.regression(1.5), r"regression index must be an int.*got 1.5"),
    (lambda: targets.regression("0"), r"regression index must be an int.*got '0'"),
    (lambda: targets.regression(True), r"regression index must be an int.*got True"),
    (lambda: targets.regression([0, 1]), r"regression index must be an int.*got \[0, 1\]"),
    (lambda: targets.activation("features.0", 1.5), r"activation channel must be an int.*got 1.5"),
    (lambda: targets.activation("features.0", "1"), r"activation channel must be an int.*got '1'"),
    (lambda: targets.classes("x"), r"expected a class index.*got 'x'"),
    (lambda: targets.classes(None), r"got None; None \(the target itself\) is each image's top class"),
    (lambda: targets.multilabel("ab"), r"multilabel expects.*got 'ab'"),
    (lambda: targets.as_target(["a", "b"]), r"expected a class index.*got \['a', 'b'\]"),
    (lambda: targets.split([["a"], ["b"]]), r"several targets per image.*got \[\['a'\], \['b'\]\]"),
], ids=["reg-float", "reg-str", "reg-bool", "reg-list", "act-float", "act-str", "classes-str", "classes-none",
        "multilabel-str", "list-of-str", "nested-str"])
def test_targets_refuse_what_is_no_index(make, message):
    """``int()`` truncated ``regression(1.5)`` to output 1 and ``activation(layer, 1.5)`` to channel 1, took
    ``"0"`` and ``True``; ``torch.as_tensor`` of strings / ``None`` was a raw TypeError / RuntimeError / ValueError."""
    with pytest.raises(SalienceError, match=message):
        make()


def test_targets_take_an_index_as_a_0d_tensor_or_numpy_int():
    """The forms that worked stay: a 0-d integer tensor and a numpy int are the index they hold."""
    m = _cnn()
    out = m.eval()(X)
    assert torch.equal(targets.regression(torch.tensor(1))(out), out[:, 1])
    assert torch.equal(targets.regression(np.int64(2), "decrease")(out), -out[:, 2])
    assert targets.activation("features.0", np.int64(3)).channel == 3


# ----------------------------------------------------------------------------- reduce

@pytest.mark.parametrize("fn", [R.max_abs, R.max_signed, R.colored, R.grayscale, R.l2, R.absolute, R.negate,
                                R.small_values, R.relu])
@pytest.mark.parametrize("grad", [np.ones((1, 3, 2, 2)), [1.0, 2.0], torch.ones(1, 3, 2, 2) > 0],
                         ids=["numpy", "list", "bool"])
def test_reduce_functions_refuse_what_is_no_gradient(fn, grad):
    """A numpy array or a list was a raw AttributeError ('no attribute dim / abs / clamp'), a bool tensor
    torch's raw NotImplementedError ('abs_cpu not implemented for Bool')."""
    with pytest.raises(SalienceError, match="expects a real-valued torch.Tensor"):
        fn(grad)


# ----------------------------------------------------------------------------- normalize

@pytest.mark.parametrize("m", [torch.zeros(0, 3, 3), torch.zeros(2, 0, 0), torch.zeros(0, 3, 3, dtype=torch.bfloat16)],
                         ids=["no-images", "no-pixels", "bf16"])
@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_normalize_gives_an_empty_map_back_empty(m, mode):
    """0 images was a raw RuntimeError ('cannot reshape tensor of 0 elements'), 0 pixels a raw IndexError."""
    out = salience.normalize(m, mode=mode)
    assert out.shape == m.shape and out.dtype == m.dtype


@pytest.mark.parametrize("m, options, message", [
    (torch.tensor(3.0), {}, r"expected a tensor \(B, ...\), got a 0-d tensor"),
    (np.ones((2, 3, 3)), {}, r"normalize expects a real-valued torch.Tensor.*ndarray"),
    ([[[0.0, 1.0]]], {}, r"normalize expects a real-valued torch.Tensor.*list"),
    (torch.rand(2, 3, 3), {"mode": "percentile", "percentile": "99"}, r"percentile must be a finite number"),
    (torch.rand(2, 3, 3), {"mode": "percentile", "percentile": None}, r"percentile must be a finite number"),
    (torch.rand(2, 3, 3), {"eps": "x"}, r"eps must be a finite number >= 0"),
    (torch.rand(2, 3, 3), {"eps": None}, r"eps must be a finite number >= 0"),
    (torch.rand(2, 3, 3), {"eps": float("nan")}, r"eps must be a finite number >= 0"),
    (torch.rand(2, 3, 3), {"eps": -1.0}, r"eps must be a finite number >= 0"),
    (torch.tensor([[[float("nan"), 1.0], [0.0, 2.0]]]), {}, r"1 NaN or infinite value\(s\) \(image\(s\) \[0\]\)"),
    (torch.tensor([[[1.0, 1.0]], [[float("inf"), 2.0]]]), {"mode": "percentile"}, r"image\(s\) \[1\]"),
    (torch.empty(2, 3, 3, device="meta"), {}, r"on the meta device"),
], ids=["0d", "numpy", "list", "percentile-str", "percentile-none", "eps-str", "eps-none", "eps-nan", "eps-neg",
        "nan-pixel", "inf-pixel", "meta"])
def test_normalize_refuses_what_it_cannot_scale(m, options, message):
    """Raw IndexError (0-d), AttributeError (numpy, list), TypeError (a percentile or eps of another type);
    eps=NaN, and a single NaN pixel, made the whole map NaN silently."""
    with pytest.raises(SalienceError, match=message):
        salience.normalize(m, **options)


def test_normalize_values_by_hand():
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])
    assert torch.equal(salience.normalize(m), (m - 1) / 4)
    assert torch.equal(salience.normalize(torch.rand(2, 2) > 2), torch.zeros(2, 2))  # a bool mask: all 0


# ----------------------------------------------------------------------------- rules

class _NoRelu(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 4, 3, padding=1), act, nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("act", [nn.Tanh(), nn.Identity()], ids=["tanh", "linear"])
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_a_rule_on_a_model_without_relus_is_refused_not_vanilla_in_disguise(act, method):
    """With no rectifier in the pass the rule changes nothing: the map was vanilla's, returned silently as
    guided backprop's / deconvnet's. Refused by default; with unsupported="warn" a warning and the plain
    gradient; with "ignore" the plain gradient."""
    torch.manual_seed(0)
    m = _NoRelu(act)
    kw = {"layer": "conv"} if method == "guided_gradcam" else {}
    fn = getattr(salience, method)
    with unchanged(m):
        with pytest.raises(SalienceError, match="found no ReLU in the model's forward pass.*unsupported='ignore'"):
            fn(m, X, **kw)
        with pytest.warns(UserWarning, match="found no ReLU"):
            warned = fn(m, X, reduce=None, unsupported="warn", **kw)
    if method != "guided_gradcam":
        assert torch.equal(warned, salience.vanilla(m, X, reduce=None))
        assert torch.equal(fn(m, X, reduce=None, unsupported="ignore"), warned)


def test_a_rule_stopped_at_a_layer_before_any_relu_is_refused_as_a_pass_without_relu():
    """A target on a layer before the first ReLU: no ReLU lies on the path, so guided backprop's map is the plain
    gradient, vanilla's. It ran silently; now refused as a whole pass without ReLUs is (every path alike: the same
    silence let a ReLU-free model's last layer through, tests/test_s39_guided_refusals.py), and taken with
    ``unsupported="ignore"``."""
    m = _cnn()
    t = targets.activation("features.0", 1)
    with unchanged(m), pytest.raises(SalienceError, match="found no ReLU.*before the target's layer"):
        salience.guided_backprop(m, X, t)
    with unchanged(m), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(salience.guided_backprop(m, X, t, reduce=None, unsupported="ignore"),
                              salience.vanilla(m, X, t, reduce=None))


# ----------------------------------------------------------------------------- performance

def test_set_performance_inside_a_block_is_in_force_for_the_options_the_block_does_not_name():
    """A block took a snapshot of every option: ``set_performance(chunks=...)`` inside
    ``performance(memory_format=...)`` was not in force in the block (and a thread's long block never saw
    another thread's setting)."""
    before = perf._process
    try:
        with salience.performance(memory_format="channels_last"):
            salience.set_performance(chunks="throughput", memory_format="contiguous")
            inside = perf.current()
        after = perf.current()
    finally:
        perf._process = before
    assert (inside.memory_format, inside.chunks) == ("channels_last", "throughput")
    assert (after.memory_format, after.chunks) == ("contiguous", "throughput")
    assert perf.current() == before


def test_performance_blocks_nest_and_are_undone_after_an_error():
    with pytest.raises(KeyError):
        with salience.performance(memory_format="channels_last"):
            with salience.performance(chunks="throughput") as inner:
                assert (inner.memory_format, inner.chunks) == ("channels_last", "throughput")
                raise KeyError
    assert perf.current() == perf.Performance()


@pytest.mark.parametrize("name", ["fold_batchnorm", "compile"])
def test_performance_takes_numpy_bools_as_every_flag_does(name):
    """``np.True_`` was 'must be True or False; got np.True_' (every other bool option takes numpy's)."""
    with salience.performance(**{name: np.bool_(True)}) as p:
        assert getattr(p, name) is True


def test_smoothgrad_names_the_settings_it_does_not_take_as_keywords():
    """``smoothgrad(chunks=...)`` said only 'vanilla has no option chunks'."""
    with pytest.raises(SalienceError, match=r"\(nor has smoothgrad\).*chunks is a setting.*salience.performance"):
        salience.smoothgrad(_cnn(), X, samples=2, chunks="memory")


# ----------------------------------------------------------------------------- reduce= of smoothgrad

@pytest.mark.parametrize("reduce", ["l2", "colored", lambda g: None, R.grayscale])
def test_smoothgrad_refuses_a_reduce_for_maps_without_channels(reduce):
    """SmoothGrad over Grad-CAM's (B, H, W) maps ignored any reduce (even a function returning None)."""
    m = _cnn()
    with unchanged(m), pytest.raises(SalienceError, match=r"gradcam's maps \(B, H, W\) have none"):
        salience.smoothgrad(m, X, samples=2, method=salience.gradcam, layer="features.3", reduce=reduce)


def test_smoothgrad_of_gradcam_with_the_default_reduce_is_the_mean_of_the_maps():
    m = _cnn()
    a = salience.smoothgrad(m, X, samples=2, method=salience.gradcam, layer="features.3")
    b = salience.smoothgrad(m, X, samples=2, method=salience.gradcam, layer="features.3", reduce=None)
    assert a.shape == (3, 8, 8) and torch.equal(a, b)


# ----------------------------------------------------------------------------- perturbation targets

@pytest.mark.parametrize("method, kw", [(salience.occlusion, {"window": 4}), (salience.rise, {"masks": 4}),
                                        (salience.scorecam, {"layer": "features.3"}),
                                        (salience.ablationcam, {"layer": "features.3"})],
                         ids=["occlusion", "rise", "scorecam", "ablationcam"])
@pytest.mark.parametrize("score", [lambda o: o[:, 0] > 0, lambda o: o.argmax(1)], ids=["bool", "argmax"])
def test_perturbation_methods_refuse_scores_that_are_not_numbers(method, kw, score):
    """A custom target giving bools or class indices: occlusion's raw NotImplementedError (bool subtraction),
    Score-CAM's raw RuntimeError ('Index put requires the source and destination dtypes match'); RISE and
    Ablation-CAM made a map of them silently."""
    m = _cnn()
    with unchanged(m), pytest.raises(SalienceError, match="needs the target's scores as floating-point numbers"):
        method(m, X, score, **kw)


# ----------------------------------------------------------------------------- METHODS

@pytest.mark.parametrize("name", ["gradcam", "guided_gradcam", "layercam", "eigencam", "scorecam", "ablationcam"])
def test_the_cams_refuse_a_model_that_is_no_module(name):
    """``model=None`` was the default-layer search's raw AttributeError ('NoneType' has no 'named_modules')."""
    with pytest.raises(SalienceError, match="expected a torch.nn.Module as the model, got NoneType"):
        salience.METHODS[name](None, X)


# ----------------------------------------------------------------------------- attention

class _TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Conv2d(3, 8, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.a = nn.MultiheadAttention(8, 2, batch_first=True)
        self.h = nn.Linear(8, 3)

    def forward(self, x):
        t = self.p(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.h((t + self.a(t, t, t, need_weights=False)[0])[:, 0])


@pytest.mark.parametrize("options, message", [
    ({"grads": True, "reduce": lambda a: a}, r"grads=True needs the matrices themselves"),
    ({"batch": "2"}, r"batch must be an int >= 1"),
    ({"batch": -1}, r"batch must be an int >= 1"),
    ({"batch": 2.0}, r"batch must be an int >= 1"),
    ({"reduce": 3}, r"reduce must be None or a function"),
], ids=["grads-and-reduce", "batch-str", "batch-neg", "batch-float", "reduce-int"])
def test_attention_capture_refuses_its_bad_options(options, message):
    """A raw ValueError (grads with reduce), and raw TypeError / RuntimeError only when the first 3-D
    attention matrix was split by ``batch`` or reduced."""
    with pytest.raises(SalienceError, match=message):
        salience.attention.AttentionCapture(**options)


@pytest.mark.parametrize("x, options, message", [
    (X[0], {}, r"expected x of shape \(B, C, H, W\)"),
    (X.numpy(), {}, r"expected x as a torch.Tensor"),
    ((X * 255).long(), {}, r"expected a floating-point x"),
    (X, {"forward": 3}, r"forward must be None or a function"),
    (X, {"reduce": 3}, r"reduce must be None or a function"),
], ids=["chw", "numpy", "int", "forward-int", "reduce-int"])
def test_attention_maps_checks_its_input(x, options, message):
    """Raw errors of the model's forward (size mismatch, conv2d of a numpy array, Long input) or of the
    capture ('int' object is not callable)."""
    model = _TinyViT()
    with unchanged(model), pytest.raises(SalienceError, match=message):
        salience.attention.attention_maps(model, x, **options)


def test_attention_maps_of_a_tiny_vit():
    model = _TinyViT()
    maps = salience.attention.attention_maps(model, X)
    assert len(maps) == 1 and maps[0].shape == (3, 2, 5, 5)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 2, 5))  # rows of a softmax


@pytest.mark.parametrize("target", [targets.activation("nope", 0), targets.custom(lambda o: o.mean(), layer="zz")],
                         ids=["activation", "custom"])
def test_the_target_free_entry_refuses_a_target_on_a_layer_the_model_lacks(target):
    """``METHODS["eigencam"]`` took a target on a layer name the model does not have silently (every other
    method says 'the model has no layer named ...')."""
    m = _cnn()
    with unchanged(m), pytest.raises(SalienceError, match="the model has no layer named"):
        salience.METHODS["eigencam"](m, X, target, layer="features.3")
