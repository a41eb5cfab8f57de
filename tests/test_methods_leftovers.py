"""The leftovers of the methods audit (tests/test_methods_audit.py): one check of a baseline tensor for integrated
gradients and occlusion, ``rise(seed=None)``, a NaN score's refusal naming the images, Guided Grad-CAM's product
of two finite maps, TorchScript under fp16 after bf16, unknown options. Each test here failed before its fix."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

from conftest import SmallCNN, unchanged

X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
CHEAP = {"smoothgrad": {"samples": 2, "noise": 0.0}, "integrated_gradients": {"steps": 2},
         "rise": {"masks": 4, "cell": 2}}


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


# ---------------------------------------------------------------------------------------------- one baseline check

@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_a_baseline_tensor_is_checked_by_one_rule(method):
    """Integrated gradients said "does not fit x", occlusion "a baseline tensor must broadcast to the input", each
    with its own words; one check now says, for both, what came and the shapes that fit, and counts values that
    are not finite; a finite float64 1e300, inf in float32, is said to be too large for x's dtype."""
    model = _cnn()
    fits = r"give a tensor that does: \(2, 3, 8, 8\), \(1, 3, 8, 8\), \(3, 8, 8\) or a per-channel \(3, 1, 1\)$"
    with unchanged(model), pytest.raises(SalienceError, match=r"^baseline of shape \(2, 1, 1\) does not broadcast to x "
                                                              r"of shape \(2, 3, 8, 8\); " + fits):
        salience.METHODS[method](model, X, 0, baseline=torch.zeros(2, 1, 1), **CHEAP.get(method, {}))
    huge = torch.zeros(3, 1, 1, dtype=torch.float64)
    huge[1] = 1e300
    # finite as given: not "contains 1 NaN or infinite value(s)", which it does not
    with unchanged(model), pytest.raises(SalienceError, match=r"^baseline has values too large for x's dtype "
                                                              r"torch.float32 \(its largest magnitude 1e\+300; "):
        salience.METHODS[method](model, X, 0, baseline=huge, **CHEAP.get(method, {}))
    huge[1] = float("nan")
    with pytest.raises(SalienceError, match=r"^baseline contains 1 NaN or infinite value\(s\)"):
        salience.METHODS[method](model, X, 0, baseline=huge, **CHEAP.get(method, {}))


# ---------------------------------------------------------------------------------------------- rise(seed=None)

def test_rise_seed_none_draws_fresh_masks(monkeypatch):
    """``rise(seed=None)`` was refused ("seed must be an int") where SmoothGrad's ``seed=None`` draws a fresh seed.
    Now the same: two calls have masks of their own, each call's map is that of an int seed (the drawn one), and
    the caller's global RNG is neither used nor changed."""
    model = _cnn().eval()
    state = torch.get_rng_state()
    a = salience.rise(model, X, 1, masks=8, cell=2, seed=None)
    b = salience.rise(model, X, 1, masks=8, cell=2, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a, b)
    monkeypatch.setattr(salience.methods.perturbation, "fresh_seed", lambda: 123)
    torch.testing.assert_close(salience.rise(model, X, 1, masks=8, cell=2, seed=None),
                               salience.rise(model, X, 1, masks=8, cell=2, seed=123), rtol=0, atol=0)
    assert torch.equal(salience.rise(model, X, 1, masks=8, cell=2), salience.rise(model, X, 1, masks=8, cell=2, seed=0))


# ---------------------------------------------------------------------------------------------- which image's score

class _BadImages(nn.Module):
    """Class 1's score is NaN for the images whose first pixel is above 10 (a log of a negative number)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        bad = (x.flatten(1)[:, 0] > 10).to(y.dtype)
        return torch.cat([y[:, :1], y[:, 1:2] + torch.log(1 - 2 * bad)[:, None], y[:, 2:]], dim=1)


def _bad_batch() -> torch.Tensor:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[1, 0, 0, 0] = x[3, 0, 0, 0] = 20.0
    return x


GRADIENT = ["vanilla", "guided_backprop", "deconvnet", "input_x_gradient", "smoothgrad", "integrated_gradients",
            "gradcam", "guided_gradcam", "gradcam_plus_plus", "hirescam", "xgradcam", "layercam"]
PERTURBATION = ["occlusion", "rise", "scorecam", "ablationcam"]


@pytest.mark.parametrize("method", GRADIENT + PERTURBATION)
def test_a_nan_score_names_the_images_and_the_class(method):
    """A batch refused for one image's NaN score said "the target's score is NaN or infinite" (or "the model's scores
    of the perturbed images are ..."): which call, not which image. It names them now, and the class, from the
    same one deferred check (the many-pass methods in chunks of one item: the items mapped back to images)."""
    model = _BadImages()
    options = dict(CHEAP.get(method, {}))
    if method in ("smoothgrad", "integrated_gradients") or method in PERTURBATION:
        options["chunk"] = 1
    with unchanged(model), pytest.raises(SalienceError, match=r"NaN or infinite \(images 1, 3 of 4, class 1\)"):
        salience.METHODS[method](model, _bad_batch(), 1, **options)


@pytest.mark.parametrize("call", [
    lambda m, x, t: salience.vanilla(m, x, t),
    lambda m, x, t: salience.smoothgrad(m, x, t, samples=2, noise=0.0, chunk=3,
                                        method=salience.integrated_gradients, steps=3),
    lambda m, x, t: salience.smoothgrad(m, x, t, samples=2, noise=0.0, chunk=3, method=salience.occlusion, window=4),
], ids=["vanilla", "smoothgrad-of-ig", "smoothgrad-of-occlusion"])
def test_a_nan_score_of_one_target_of_several(call):
    """Two targets per image (class 1 is target 1 of images 1 and 3, target 2 of images 0 and 2, where it is
    finite): the message names the target and its class; a nested call maps its items through both chunkings."""
    t = torch.tensor([[0, 1], [1, 2], [3, 1], [1, 0]])
    with pytest.raises(SalienceError, match=r"NaN or infinite \(images 1, 3 of 4; target 1 of 2, class 1\)"):
        call(_BadImages(), _bad_batch(), t)


def test_a_nan_score_of_a_function_target_names_the_images():
    """A target that is a function of the output (no class): the images alone; a scalar loss: no image to name."""
    model = _BadImages()
    with pytest.raises(SalienceError, match=r"^the target's score is NaN or infinite \(images 1, 3 of 4\) \(the"):
        salience.vanilla(model, _bad_batch(), lambda out: out[:, 1] * 2)
    with pytest.raises(SalienceError, match=r"^the target's score is NaN or infinite \(the model's output"):
        salience.vanilla(model, _bad_batch(), lambda out: out[:, 1].sum())


# ---------------------------------------------------------------------------------------------- Guided Grad-CAM

def _huge_scores(dtype: torch.dtype) -> nn.Module:
    """:class:`SmallCNN` whose scores are about 1e37 (float32's largest value is 3.4e38)."""
    model = _cnn().eval()
    with torch.no_grad():
        model.head.weight.mul_(1e38)
        model.head.bias.mul_(1e38)
    return model.to(dtype)


def test_guided_gradcam_of_huge_scores_says_the_product_overflows():
    """Scores near 1e37 in float32: guided backprop's map and Grad-CAM's are finite (about 2e34 and 3e34), their
    product (about 8e68) is not a float32, and the map was ``inf`` silently. It is refused now, saying so, from the
    call's one deferred check; a float64 copy gives the product, equal to the two maps multiplied by hand."""
    model = _huge_scores(torch.float32)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model(x).abs().amax() > 1e36
    gb, cam = salience.guided_backprop(model, x, 1, reduce=None), salience.gradcam(model, x, 1)
    assert torch.isfinite(gb).all() and torch.isfinite(cam).all() and (gb.abs().amax() * cam.amax()).isinf()
    with unchanged(model), pytest.raises(SalienceError, match=r"guided backprop's map reaches .*e\+3\d and Grad-CAM's "
                                                              r".*e\+3\d, each finite, but their product \(.*e\+6\d\) "
                                                              r"exceeds torch.float32's .*explain a float64 copy"):
        salience.guided_gradcam(model, x, 1, reduce=None)
    model64, x64 = _huge_scores(torch.float64), x.double()
    got = salience.guided_gradcam(model64, x64, 1, reduce=None)
    want = salience.guided_backprop(model64, x64, 1, reduce=None) * salience.gradcam(model64, x64, 1)[:, None]
    assert torch.isfinite(got).all() and got.abs().amax() > 1e60
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- TorchScript, bf16 / fp16

@pytest.mark.parametrize("method, options", [("smoothgrad", {"samples": 2}), ("integrated_gradients", {"steps": 3})])
def test_a_scripted_model_takes_fp16_after_bf16(method, options):
    """A TorchScript model run with ``precision="fp16"`` after ``"bf16"`` in one process raised TorchScript's raw
    "The following operation failed in the TorchScript interpreter ... expected m1 and m2 to have the same dtype,
    but got: c10::Half != c10::BFloat16" (torch's own: its optimized executor keeps the first autocast dtype's
    backward graph). Each precision's map now equals the Python model's under the same precision."""
    torch.manual_seed(0)
    python = SmallCNN().eval()
    scripted = torch.jit.script(python)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for precision in ("bf16", "fp16", "bf16", "fp32"):
        got = salience.METHODS[method](scripted, x, 1, precision=precision, **options)
        want = salience.METHODS[method](python, x, 1, precision=precision, **options)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------- unknown options

@pytest.mark.parametrize("call, hint", [
    (lambda: salience.smoothgrad(SmallCNN().eval(), X, 0, samples=2, method=salience.gradcam, layers="features"),
     r"gradcam has no option 'layers' \(nor has smoothgrad\); did you mean 'layer'\? \(gradcam's options: layer, .*; "
     r"smoothgrad's: method, samples, .*\)$"),
    (lambda: salience.smoothgrad(SmallCNN().eval(), X, 0, sample=2),
     r"vanilla has no option 'sample' \(nor has smoothgrad\); did you mean 'samples'\? \(vanilla's options: reduce, "
     r"grad_modifier, strip_softmax; smoothgrad's: method, samples, .*\)$"),
    (lambda: salience.methods.options.with_options(salience.METHODS, "gradcam", {"layers": "features"}),
     r"method 'gradcam' takes no option 'layers' \(it takes: layer, .*\); did you mean 'layer'\?$"),
], ids=["smoothgrad-inner", "smoothgrad-own", "method_options"])
def test_an_unknown_option_where_salience_forwards_it_says_the_close_one(call, hint):
    """Where salience hands the user's keywords on (SmoothGrad's ``**options`` to its method, ``method_options`` of
    dataset runs and evaluations), an unknown one named no close option: a typo of SmoothGrad's own ``samples``
    was "vanilla has no option 'sample'". SmoothGrad's says both methods' options (session 57; a direct call of a
    method is an ArgumentError naming its options since session 56, tests/test_s56_keywords.py)."""
    with pytest.raises(SalienceError, match=hint):
        call()


@pytest.mark.parametrize("flag, hint", [("--layers", "--layer"), ("--smaples", "--samples")])
def test_an_unknown_flag_says_the_close_one(capsys, flag, hint):
    """argparse said "unrecognized arguments: --layers features" and no more."""
    from salience.cli import main

    assert main(["explain", "a.png", "--model", "demo:shapes", "--method", "gradcam", flag, "3"]) == 2
    assert f"unrecognized arguments: {flag} 3; did you mean '{hint}'?" in capsys.readouterr().err


def _held_tensors(fn, depth: int = 3) -> list:
    """The tensors a function's closure holds (and its closures' functions', ``depth`` levels)."""
    held = []
    for cell in getattr(fn, "__closure__", None) or ():
        v = cell.cell_contents
        if isinstance(v, torch.Tensor):
            held.append(v)
        elif callable(v) and depth:
            held += _held_tensors(v, depth - 1)
    return held


def test_the_deferred_checks_hold_no_chunks_tensors():
    """A deferred check's action waits for the end of the call: Guided Grad-CAM's held its product (B, K, C, H, W)
    and ``derived``'s the chunk's input, so inside SmoothGrad the last chunk's product and noisy copies stayed
    alive through the next chunk (memory the engine's budget did not measure), until the call ended."""
    from salience._core import derived as _derived

    model = _cnn().eval()
    with _derived.run_scope() as scope:  # the call's scope, kept open to look at its deferred actions
        salience.smoothgrad(model, X, 1, method=salience.guided_gradcam, samples=4, chunk=2, layer="features.3")
        actions = [a for _, a in scope._flags.values()]
        assert len(actions) >= 3
        held = [t for a in actions for t in _held_tensors(a)]
    assert all(t.numel() <= 2 for t in held), [tuple(t.shape) for t in held]


def _head(t: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = torch.relu(torch.mm(t, w1) + 1.0)
    h = torch.sigmoid(torch.mm(h, w1) * 2.0) + h
    return torch.mm(h, w2)


class _CallsAScriptedFunction(nn.Module):
    """A Python model whose forward calls ``head`` (a scripted function: no module of it is a ScriptModule)."""

    def __init__(self, head) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.w2 = nn.Parameter(torch.randn(12, 12) * 0.1), nn.Parameter(torch.randn(12, 4) * 0.1)
        self.head = head

    def forward(self, x):
        return self.head(x.mean((2, 3)).repeat(1, 4), self.w1, self.w2)


def test_a_model_calling_a_scripted_function_takes_fp16_after_bf16():
    """The JIT's optimized execution was turned off only for a model with a ScriptModule among its modules: a
    Python model calling a scripted function failed as before ("AD_mm_backward_self ... RuntimeError") in fp16
    after bf16. Each precision's map equals the same function's, not scripted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        scripted = _CallsAScriptedFunction(torch.jit.script(_head)).eval()
    python = _CallsAScriptedFunction(_head).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for precision in ("bf16", "fp16", "bf16"):
        got = salience.smoothgrad(scripted, x, 1, precision=precision, samples=2)
        torch.testing.assert_close(got, salience.smoothgrad(python, x, 1, precision=precision, samples=2),
                                   rtol=1e-3, atol=1e-6)
