"""Class model visualization and filter visualization: closed forms, score ascent, regularizers, hygiene."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, targets
from salience._core.info import ModelInfo, attach_info
from salience.methods.class_model import class_model, gaussian_blur, total_variation, tv_gradient

from conftest import unchanged

PLAIN = dict(tv=0.0, jitter=0, blur_every=0)  # the paper's ascent: no regularizer but L2


def _linear(c: int = 2, h: int = 4, w: int = 5, k: int = 3, softmax: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, k)]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("softmax", [False, True])
def test_linear_model_closed_form(softmax: bool) -> None:
    # max_I  w_c . I + b_c - lam ||I||^2  has its optimum at  I = w_c / (2 lam); plain ascent with
    # lr * 2 lam = 0.5 halves the distance to it at each step. A final softmax is bypassed.
    model = _linear(softmax=softmax)
    lam = 0.25
    with unchanged(model):
        img = class_model(model, [0, 2], shape=(2, 4, 5), optimizer="ascent", lr=1.0, l2=lam, steps=60, clip=None,
                          **PLAIN)
    w = model[1].weight.detach()
    assert img.shape == (2, 2, 4, 5)
    torch.testing.assert_close(img[0].flatten(), w[0] / (2 * lam), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(img[1].flatten(), w[2] / (2 * lam), rtol=1e-5, atol=1e-6)


def test_history_and_callback_follow_the_ascent() -> None:
    model = _linear()
    lam, lr = 0.25, 1.0
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    img, hist = class_model(
        model, 1, shape=(2, 4, 5), optimizer="ascent", lr=lr, l2=lam, steps=5, clip=None, return_history=True, **PLAIN,
        callback=lambda s, im, sc: seen.append((s, im.clone(), sc.clone())),
    )
    w, b = model[1].weight.detach()[1], model[1].bias.detach()[1]
    # By hand: I_0 = 0, I_{t+1} = I_t + lr (w - 2 lam I_t); the score recorded at step t is w.I_t + b.
    i = torch.zeros_like(w)
    expected = []
    for _ in range(5):
        expected.append(w @ i + b)
        i = i + lr * (w - 2 * lam * i)
    torch.testing.assert_close(hist[:, 0], torch.stack(expected))
    assert hist.shape == (5, 1)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(seen[-1][1], img)
    torch.testing.assert_close(img.flatten(), i)


def test_callback_stops_early() -> None:
    model = _linear()
    img, hist = class_model(model, 0, shape=(2, 4, 5), steps=50, clip=None, return_history=True,
                            callback=lambda s, im, sc: s == 6)
    assert hist.shape == (7, 1)


def test_demo_model_class_scores_rise_above_the_others() -> None:
    model = salience.zoo.load_demo("shapes")
    with unchanged(model):
        img, hist = class_model(model, [0, 1, 2, 3, 4], steps=100, return_history=True,
                                 generator=torch.Generator().manual_seed(0))  # the default regularizers
    assert img.shape == (5, 3, 64, 64)  # default shape from the model's ModelInfo
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0  # clip="auto": [0, 1] for this model
    with torch.no_grad():
        out = model(img)
    for c in range(5):
        start, end = float(hist[0, c]), float(out[c, c])
        assert end > start + 10.0, (c, start, end)
        others = torch.cat([out[c, :c], out[c, c + 1:]])
        assert end > float(others.max()) + 5.0, (c, out[c])


def test_l2_shrinks_the_image(small_cnn: nn.Module) -> None:
    norms = []
    for lam in (0.01, 0.1, 1.0):
        img = class_model(small_cnn, 2, shape=(3, 12, 12), steps=60, l2=lam, clip=None, **PLAIN)
        norms.append(float(img.norm()))
    assert norms[0] > norms[1] > norms[2] > 0, norms
    assert norms[0] > 2 * norms[2]


def test_filter_visualization_raises_the_filters_activation() -> None:
    # What does filter 3 of the demo model's second block look for? The optimized image drives its
    # mean activation far above its value on any real image of the data set.
    model = salience.zoo.load_demo("shapes")
    layer, ch = "features.2", 3
    acts: list[torch.Tensor] = []
    handle = model.features[2].register_forward_hook(lambda m, i, o: acts.append(o[:, ch].mean((1, 2))))
    try:
        with torch.no_grad():
            model(salience.data.shapes(16, 5)[0])
    finally:
        handle.remove()
    best_real = float(acts[-1].max())
    with unchanged(model):
        img, hist = class_model(model, targets.activation(layer, ch), steps=30, seed=0.4, l2=1e-3, return_history=True,
                                **PLAIN)
    with torch.no_grad():
        final = float(model.features[:3](model.normalize(img))[0, ch].mean())
    assert final > 2 * best_real > 0, (best_real, final)
    assert final > 2 * float(hist[0, 0])


def test_several_targets_on_different_layers_match_separate_runs(small_cnn: nn.Module) -> None:
    t1, t2, t3 = targets.activation("features.0", 1), targets.classes(3), targets.activation("features.0", 4)
    kw = dict(shape=(3, 8, 8), steps=15, clip=None, **PLAIN)
    together = class_model(small_cnn, [t1, t2, t3], **kw)
    for i, t in enumerate((t1, t2, t3)):
        torch.testing.assert_close(together[i:i + 1], class_model(small_cnn, t, **kw))
    # A list of class indices is one batch; the same as one run per class.
    both = class_model(small_cnn, [0, 3], **kw)
    torch.testing.assert_close(both[1:], class_model(small_cnn, 3, **kw))


def test_tv_gradient_is_the_gradient_of_total_variation() -> None:
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(total_variation(x).sum(), x)
    torch.testing.assert_close(tv_gradient(x.detach()), g)
    # By hand on one row: TV([0, 1, 3]) = 1 + 4.
    assert float(total_variation(torch.tensor([[[[0.0, 1.0, 3.0]]]]))) == 5.0


def test_gaussian_blur_is_the_core_one() -> None:
    from salience._core import tensors

    assert gaussian_blur is tensors.gaussian_blur
    x = torch.rand(1, 2, 5, 5)
    assert gaussian_blur(x, 0.0) is not x and torch.equal(gaussian_blur(x, 0.0), x)   # sigma <= 0: a copy


def test_gaussian_blur_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 2, 9, 11, dtype=torch.float64)
    ours = gaussian_blur(x, 1.0)
    ref = torch.stack([torch.from_numpy(ndimage.gaussian_filter(x[0, c].numpy(), 1.0, mode="mirror", truncate=3.0))
                       for c in range(2)])
    torch.testing.assert_close(ours[0], ref)


def test_tv_optimum_is_stationary_and_smoother() -> None:
    # With a linear score, plain ascent converges to the point where the whole gradient vanishes:
    # w - 2 l2 I - tv dTV/dI = 0, checked with the closed-form TV gradient.
    model = _linear(c=1, h=6, w=6, k=2)
    w = model[1].weight.detach()[0].view(1, 1, 6, 6)
    kw = dict(shape=(1, 6, 6), optimizer="ascent", lr=0.05, l2=0.5, steps=600, clip=None, jitter=0)
    rough = class_model(model, 0, tv=0.0, blur_every=0, **kw)
    smooth = class_model(model, 0, tv=2.0, blur_every=0, **kw)
    torch.testing.assert_close(w - 2 * 0.5 * smooth - 2.0 * tv_gradient(smooth), torch.zeros_like(w),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(rough, w)  # w / (2 l2)
    rel = lambda im: float(total_variation(im)) / float((im - im.mean()).pow(2).sum())  # noqa: E731
    assert rel(smooth) < 0.5 * rel(rough)
    blurred = class_model(model, 0, tv=0.0, blur_every=1, blur_sigma=1.0, **kw)
    assert rel(blurred) < 0.5 * rel(rough)


def test_jitter_rolls_the_gradient_back() -> None:
    # One plain step from zero on a linear model: the image is lr * (w rolled back by the shift).
    model = _linear(c=1, h=6, w=6, k=2)
    gen = torch.Generator().manual_seed(3)
    dy, dx = (int(s) for s in torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(3)))
    assert (dy, dx) != (0, 0)
    img = class_model(model, 1, shape=(1, 6, 6), steps=1, optimizer="ascent", lr=1.0, l2=0.0, jitter=2,
                      clip=None, generator=gen, tv=0.0, blur_every=0)
    w = model[1].weight.detach()[1].view(1, 6, 6)
    torch.testing.assert_close(img[0], torch.roll(w, (-dy, -dx), (1, 2)))
    # Its score on the shifted view is the best a unit step can do: |w|^2 + b.
    with torch.no_grad():
        best = float(model(torch.roll(img, (dy, dx), (2, 3)))[0, 1])
    assert best == pytest.approx(
        float(w.pow(2).sum() + model[1].bias.detach()[1]), rel=1e-5)


def test_clip_auto_uses_model_info_mean_and_std() -> None:
    model = _linear(c=3, h=4, w=4, k=2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    attach_info(model, ModelInfo(input_size=(4, 4), mean=mean, std=std))
    img = class_model(model, 0, steps=30, lr=1e3, l2=0.0, optimizer="ascent", **PLAIN)
    assert img.shape == (1, 3, 4, 4)
    lo = (0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    w = model[1].weight.detach()[0].view(3, 4, 4)
    # Without a penalty the linear score is maximized at the bounds: hi where w > 0, lo where w < 0.
    expected = torch.where(w > 0, hi.view(3, 1, 1), lo.view(3, 1, 1))
    torch.testing.assert_close(img[0], expected)
    fixed = class_model(model, 0, steps=30, lr=1e3, l2=0.0, optimizer="ascent", clip=(-0.5, 0.25), **PLAIN)
    torch.testing.assert_close(fixed[0], torch.where(w > 0, 0.25, -0.5))


def test_progress_bar_draws(capsys: pytest.CaptureFixture) -> None:
    class_model(_linear(), 0, shape=(2, 4, 5), steps=3, progress=True, clip=None)
    err = capsys.readouterr().err
    assert "class model" in err and "3/3" in err


def test_model_is_restored_after_errors_and_interrupts(small_cnn: nn.Module) -> None:
    small_cnn.train()
    small_cnn.head.weight.grad = torch.ones_like(small_cnn.head.weight)

    def stop(step: int, image: torch.Tensor, score: torch.Tensor) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with unchanged(small_cnn):
        with pytest.raises(KeyboardInterrupt):
            class_model(small_cnn, 1, shape=(3, 8, 8), steps=10, callback=stop)
        with pytest.raises(SalienceError, match="out of range"):
            class_model(small_cnn, 9, shape=(3, 8, 8), steps=2)
        class_model(small_cnn, targets.activation("features.0", 0), shape=(3, 8, 8), steps=3, jitter=1,
                    blur_every=1, tv=0.1)
    assert small_cnn.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=None), "needs the image shape"),
        (dict(shape=(8, 8)), r"shape must be \(C, H, W\)"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(optimizer="sgd"), "optimizer must be one of"),
        (dict(l2=-1.0), "l2 must be a finite number"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(jitter=-1), "jitter must be"),
        (dict(clip=(1, 0)), "low < high"),
        (dict(clip="yes"), "clip must be"),
        (dict(seed=torch.zeros(2, 3, 8, 8)), "seed batch of 2"),
        (dict(seed=torch.zeros(3, 4, 4)), "seed has shape"),
        (dict(seed="gray"), "seed must be"),
        (dict(callback=3), "callback must be callable"),
    ],
)
def test_bad_input_raises_clear_errors(small_cnn: nn.Module, kwargs: dict, match: str) -> None:
    args = dict(shape=(3, 8, 8), steps=2)
    args.update(kwargs)
    with pytest.raises(SalienceError, match=match):
        class_model(small_cnn, [0, 1, 2], **args)


def test_exported() -> None:
    """``salience.class_model`` is the module's function, checked as the public methods are
    (``salience.methods._multi.checked``, an unknown keyword an ArgumentError), with its implementation's signature
    and docstring; not a registry method (it makes an image, it does not explain one)."""
    import inspect

    from salience._core.engine import unbind
    from salience.methods._multi import is_checked

    assert is_checked(salience.class_model) and unbind(salience.class_model) == (class_model, {})
    assert salience.class_model is salience.methods.class_model
    assert inspect.signature(salience.class_model) == inspect.signature(class_model)
    assert salience.class_model.__doc__ == class_model.__doc__
    assert "class_model" not in salience.METHODS


def test_jitter_leaves_the_global_rng_alone_and_is_reproducible() -> None:
    """Without a generator the jitter is drawn from a generator of the call's own, seeded with 0 (as
    SmoothGrad's and RISE's ``seed=0``): the global RNG is neither used nor changed (it was: every call
    advanced it, and two calls gave two images), the same call gives the same image, and the first
    step's shift is that of ``torch.Generator().manual_seed(0)``."""
    model = _linear(c=1, h=6, w=6, k=2)
    opts = dict(shape=(1, 6, 6), steps=1, optimizer="ascent", lr=1.0, l2=0.0, jitter=2, clip=None, tv=0.0,
                blur_every=0)
    state = torch.get_rng_state()
    img = class_model(model, 1, **opts)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # another global state: the same image
    assert torch.equal(class_model(model, 1, **opts), img)
    dy, dx = (int(s) for s in torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(0)))
    w = model[1].weight.detach()[1].view(1, 6, 6)
    torch.testing.assert_close(img[0], torch.roll(w, (-dy, -dx), (1, 2)))
    other = class_model(model, 1, generator=torch.Generator().manual_seed(5), **opts)
    dy5, dx5 = (int(s) for s in torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(other[0], torch.roll(w, (-dy5, -dx5), (1, 2)))
    with pytest.raises(SalienceError, match="generator must be a torch.Generator"):
        class_model(model, 1, generator=5, **opts)
