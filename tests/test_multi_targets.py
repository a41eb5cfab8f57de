"""Several targets per image in one call: every method gives (B, K, ...) equal to K separate calls."""
from __future__ import annotations

import pytest
import torch

import salience
from salience import targets

from conftest import unchanged

ONE_PASS = ["vanilla", "guided_backprop", "deconvnet", "input_x_gradient"]
ALL = ONE_PASS + ["gradcam", "guided_gradcam"]


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.rand(3, 3, 16, 16)


def _method(name):
    fn = salience.METHODS[name]
    return (lambda m, x, t, **kw: fn(m, x, t, layer="features.5", **kw)) if "gradcam" in name else fn


@pytest.mark.parametrize("name", ALL)
def test_k_targets_equal_k_calls(name, small_cnn, x):
    fn = _method(name)
    k = torch.tensor([[0, 3], [2, 2], [3, 1]])  # B = 3 images, K = 2 targets (C = 3 channels: no axis to confuse)
    with unchanged(small_cnn):
        both = fn(small_cnn, x, k)
    single = torch.stack([fn(small_cnn, x, k[:, j]) for j in range(k.shape[1])], dim=1)
    assert both.shape == single.shape == (3, 2, 16, 16)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)
    if name != "gradcam":  # the raw, per-channel maps have the K axis too, value for value
        raw = fn(small_cnn, x, k, reduce=None)
        ref = torch.stack([fn(small_cnn, x, k[:, j], reduce=None) for j in range(2)], dim=1)
        assert raw.shape == (3, 2, 3, 16, 16)
        torch.testing.assert_close(raw, ref, rtol=1e-5, atol=1e-7)
    # One image with K targets.
    one = fn(small_cnn, x[:1], k[:1])
    assert one.shape == (1, 2, 16, 16)
    torch.testing.assert_close(one, single[:1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ONE_PASS + ["gradcam"])
def test_k_targets_share_one_forward(name, small_cnn, x):
    calls = []
    handle = small_cnn.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        _method(name)(small_cnn, x, torch.tensor([[0, 1, 2, 3]] * 3))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_mixed_target_list(small_cnn, x):
    """A list holding None (the predicted class) and other targets is several targets."""
    out = salience.vanilla(small_cnn, x, [None, 2, targets.multilabel([0, 1])])
    assert out.shape == (3, 3, 16, 16)
    torch.testing.assert_close(out[:, 0], salience.vanilla(small_cnn, x))
    torch.testing.assert_close(out[:, 1], salience.vanilla(small_cnn, x, 2))
    torch.testing.assert_close(out[:, 2], salience.vanilla(small_cnn, x, targets.multilabel([0, 1])))
    # A plain list of ints is still one class per image, not several targets.
    assert salience.vanilla(small_cnn, x, [0, 1, 2]).shape == (3, 16, 16)


def test_k_targets_out_of_range(small_cnn, x):
    with pytest.raises(salience.SalienceError, match="range|out of"):
        salience.vanilla(small_cnn, x, torch.tensor([[0, 9]] * 3))


@pytest.mark.parametrize("name", ALL + ["smoothgrad", "integrated_gradients"])
def test_k_targets_of_the_wrong_batch(name, small_cnn, x):
    with unchanged(small_cnn), pytest.raises(salience.SalienceError, match=r"\(B, K\).*B = 3"):
        _method(name)(small_cnn, x, torch.tensor([[0, 1]]))


def test_a_later_target_with_the_wrong_shape(small_cnn, x):
    """Every target's scores are checked, not only the first one's; the model comes back as it was."""
    with unchanged(small_cnn), pytest.raises(salience.SalienceError, match=r"one score per sample, shape \(3,\)"):
        salience.vanilla(small_cnn, x, [lambda out: out[:, 0], lambda out: out])


def test_regression_targets_at_once(x):
    torch.manual_seed(0)
    reg = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    ts = [targets.regression(0, "increase"), targets.regression(1, "decrease"), targets.regression(0, "maintain")]
    both = salience.vanilla(reg, x, ts, reduce=None)
    for j, t in enumerate(ts):
        torch.testing.assert_close(both[:, j], salience.vanilla(reg, x, t, reduce=None), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["vanilla", "guided_backprop", "deconvnet", "input_x_gradient"])
def test_smoothgrad_shares_each_chunk_between_targets(name, small_cnn, x):
    """SmoothGrad over a one-pass method: K targets cost one forward per chunk, not K."""
    method = salience.METHODS[name]
    k = torch.tensor([[0, 3, 1], [2, 2, 0], [3, 1, 2]])
    calls = []
    handle = small_cnn.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        both = salience.smoothgrad(small_cnn, x, k, method=method, samples=4, chunk=6, noise=0.1)
    finally:
        handle.remove()
    assert len(calls) == 2  # 4 copies of 3 images in chunks of 6
    single = torch.stack([salience.smoothgrad(small_cnn, x, k[:, j], method=method, samples=4, chunk=6, noise=0.1)
                          for j in range(3)], dim=1)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)


def _forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda m, i: calls.append(1))


def test_guided_gradcam_shares_its_passes_between_targets(small_cnn, x):
    """K targets: one ruled pass (no ReLU after features.5 here), not K; equal to K calls."""
    k = torch.tensor([[0, 3, 1], [2, 2, 0], [3, 1, 2]])
    calls, h = _forwards(small_cnn)
    try:
        both = salience.guided_gradcam(small_cnn, x, k, layer="features.5")
    finally:
        h.remove()
    assert len(calls) == 1
    single = torch.stack([salience.guided_gradcam(small_cnn, x, k[:, j], layer="features.5") for j in range(3)], 1)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)


def test_guided_gradcam_with_relus_after_the_layer_takes_two_passes_for_all_targets(small_cnn, x):
    """features.3 (a conv) is followed by a ReLU: the ruled pass and one plain pass serve all K targets."""
    k = torch.tensor([[0, 3], [2, 2], [3, 1]])
    calls, h = _forwards(small_cnn)
    try:
        both = salience.guided_gradcam(small_cnn, x, k, layer="features.3")
    finally:
        h.remove()
    assert len(calls) == 2
    single = torch.stack([salience.guided_gradcam(small_cnn, x, k[:, j], layer="features.3") for j in range(2)], 1)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wrap", ["partial", "gradcam"])
def test_smoothgrad_shares_the_forward_for_any_marked_method(wrap, small_cnn, x):
    """Not a list of four function objects: a functools.partial of a method, or Grad-CAM, shares too."""
    import functools

    method = (functools.partial(salience.guided_backprop, unsupported="ignore") if wrap == "partial"
              else functools.partial(salience.gradcam, layer="features.5"))
    k = torch.tensor([[0, 3, 1], [2, 2, 0], [3, 1, 2]])
    calls, h = _forwards(small_cnn)
    try:
        both = salience.smoothgrad(small_cnn, x, k, method=method, samples=4, chunk=6, noise=0.1)
    finally:
        h.remove()
    assert len(calls) == 2  # 4 copies of 3 images in chunks of 6, the 3 targets sharing each
    single = torch.stack([salience.smoothgrad(small_cnn, x, k[:, j], method=method, samples=4, chunk=6, noise=0.1)
                          for j in range(3)], dim=1)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-7)


def test_smoothgrad_over_an_unmarked_function_calls_it_per_target(small_cnn, x):
    """A user's own method (not marked several_targets) is called once per target, and still right."""
    def mine(model, x, target=None, *, reduce=None):
        return salience.vanilla(model, x, target, reduce=reduce)

    k = torch.tensor([[0, 3], [2, 2], [3, 1]])
    both = salience.smoothgrad(small_cnn, x, k, method=mine, samples=2, noise=0.1)
    ref = salience.smoothgrad(small_cnn, x, k, method=salience.vanilla, samples=2, noise=0.1)
    torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-7)


def test_torchscript_model_with_several_targets(small_cnn, x):
    """K targets need no hook on the model: a TorchScript model takes them (it refuses hooks)."""
    scripted = torch.jit.script(small_cnn.eval())
    k = torch.tensor([[0, 3], [2, 2], [3, 1]])
    got = salience.vanilla(scripted, x, k)
    torch.testing.assert_close(got, salience.vanilla(small_cnn, x, k), rtol=1e-5, atol=1e-6)


_CHEAP = {"smoothgrad": dict(samples=2), "integrated_gradients": dict(steps=2), "rise": dict(masks=4, cell=2),
          "occlusion": dict(window=8), "scorecam": dict(layer="features.5"), "ablationcam": dict(layer="features.5")}
_TARGETED = [n for n in salience.METHODS if n not in salience.methods.TARGET_FREE_METHODS
             and n not in salience.methods.ATTENTION_METHODS]


@pytest.mark.parametrize("name", _TARGETED)
@pytest.mark.parametrize("given", [[0, 1, 2, 3], [0, 1], "multilabel"])
def test_per_image_targets_for_another_batch_size(name, given, small_cnn, x):
    """One class per image (or one class set per image) for 4 or 2 images when the batch has 3:
    every method refuses it, saying so. SmoothGrad, Integrated Gradients, RISE, Score-CAM and
    Ablation-CAM used the first 3 of 4 classes silently (each pass indexes the classes by image)."""
    target = targets.multilabel(torch.tensor([[0, 1]] * 4)) if given == "multilabel" else torch.tensor(given)
    fn = salience.METHODS[name]
    opts = dict(_CHEAP.get(name, {}), **({"layer": "features.5"} if "cam" in name and name not in _CHEAP else {}))
    with unchanged(small_cnn), pytest.raises(salience.SalienceError, match=r"for (a batch of )?\d+ (images|samples)"):
        fn(small_cnn, x, target, **opts)


@pytest.mark.parametrize("name", ["scorecam", "rise", "occlusion", "ablationcam"])
def test_a_class_targets_map_does_not_depend_on_the_targets_beside_it(name, small_cnn, x):
    """softmax="auto" decides per target: a class target is scored on the class probability and a
    function on the raw output, also when both are asked in one call. A function in the list made
    every class target of the call raw (Score-CAM's and RISE's map of class 2 changed with the list)."""
    fn = salience.METHODS[name]
    opts = dict(_CHEAP.get(name, {}), softmax="auto")
    raw = lambda out: out[:, 1]  # noqa: E731 - a custom target: its raw score
    both = fn(small_cnn, x, [2, raw], **opts)
    alone_class, alone_raw = fn(small_cnn, x, 2, **opts), fn(small_cnn, x, raw, **opts)
    torch.testing.assert_close(both[:, 0], alone_class, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(both[:, 1], alone_raw, rtol=1e-5, atol=1e-7)
    # the class probability, written out: the function of the softmax equals the class target
    prob = lambda out: out.softmax(1)[:, 2]  # noqa: E731
    torch.testing.assert_close(fn(small_cnn, x, prob, **opts), alone_class, rtol=1e-5, atol=1e-7)
