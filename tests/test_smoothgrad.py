"""SmoothGrad: equal to a plain loop over the same seeded noise, wraps any method, hygiene."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from conftest import unchanged


def _x(b: int = 3, size: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, size, size, generator=g)


def _noise_loop(x: torch.Tensor, samples: int, noise: float, seed: int):
    """The noisy copies the docs promise: one N(0, 1) draw of the batch's shape per copy."""
    gen = torch.Generator().manual_seed(seed)
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    for _ in range(samples):
        yield x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)


def test_samples_1_noise_0_is_the_method(small_cnn):
    x = _x()
    assert torch.equal(salience.smoothgrad(small_cnn, x, samples=1, noise=0), salience.vanilla(small_cnn, x))
    assert torch.equal(salience.smoothgrad(small_cnn, x, 2, samples=1, noise=0.0, reduce=None),
                       salience.vanilla(small_cnn, x, 2, reduce=None))
    assert torch.equal(salience.smoothgrad(small_cnn, x, method=salience.guided_backprop, samples=1, noise=0),
                       salience.guided_backprop(small_cnn, x))
    assert torch.equal(salience.smoothgrad(small_cnn, x, method=salience.gradcam, samples=1, noise=0),
                       salience.gradcam(small_cnn, x))
    assert torch.equal(
        salience.smoothgrad(small_cnn, x, method=salience.gradcam, samples=1, noise=0, layer="features.2"),
        salience.gradcam(small_cnn, x, layer="features.2"))


@pytest.mark.parametrize("variant", ["mean", "squared", "vargrad"])
def test_equals_plain_loop_over_seeded_noise(small_cnn, variant):
    x = _x()
    with torch.no_grad():
        cls = small_cnn.eval()(x).argmax(1)
    maps = torch.stack([salience.vanilla(small_cnn, xs, cls, reduce=None)
                        for xs in _noise_loop(x, 12, 0.2, seed=5)])
    ref = {"mean": maps.mean(0), "squared": (maps ** 2).mean(0), "vargrad": maps.var(0, unbiased=False)}[variant]
    got = salience.smoothgrad(small_cnn, x, samples=12, noise=0.2, seed=5, variant=variant, reduce=None)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    # reduce acts on the average, once
    red = salience.smoothgrad(small_cnn, x, samples=12, noise=0.2, seed=5, variant=variant)
    torch.testing.assert_close(red, ref.abs().amax(1), rtol=1e-5, atol=1e-7)


def test_reduce_each_averages_reduced_maps(small_cnn):
    x = _x()
    with torch.no_grad():
        cls = small_cnn.eval()(x).argmax(1)
    ref = torch.stack([salience.vanilla(small_cnn, xs, cls, grad_modifier="negate", reduce="grayscale")
                       for xs in _noise_loop(x, 6, 0.1, seed=0)]).mean(0)
    got = salience.smoothgrad(small_cnn, x, samples=6, noise=0.1, grad_modifier="negate", reduce="grayscale",
                              reduce_each=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    # and the default (reduce the average) differs from it
    assert not torch.allclose(salience.smoothgrad(small_cnn, x, samples=6, noise=0.1, reduce="grayscale"), ref)


def test_wraps_gradcam_and_guided_backprop(small_cnn):
    x = _x(2)
    with torch.no_grad():
        cls = small_cnn.eval()(x).argmax(1)
    for method, opts in ((salience.gradcam, {"layer": "features.2"}), (salience.guided_backprop, {})):
        kw = {} if method is salience.gradcam else {"reduce": None}
        ref = torch.stack([method(small_cnn, xs, cls, **opts, **kw) for xs in _noise_loop(x, 5, 0.15, seed=3)]).mean(0)
        got = salience.smoothgrad(small_cnn, x, method=method, samples=5, seed=3, reduce=None, chunk=3, **opts)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_chunking_does_not_change_the_result(small_cnn):
    x = _x(3)
    ref = salience.smoothgrad(small_cnn, x, samples=7, reduce=None, chunk=100)
    for chunk in (1, 2, 3, 5, None):
        got = salience.smoothgrad(small_cnn, x, samples=7, reduce=None, chunk=chunk)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    tiny = salience.smoothgrad(small_cnn, x, samples=7, reduce=None, max_memory=1)  # one copy per pass
    torch.testing.assert_close(tiny, ref, rtol=1e-5, atol=1e-7)


def test_seed_reproducible_and_global_rng_untouched(small_cnn):
    x = _x(2)
    state = torch.get_rng_state()
    a = salience.smoothgrad(small_cnn, x, samples=4, seed=11)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    torch.manual_seed(123)
    b = salience.smoothgrad(small_cnn, x, samples=4, seed=11)
    # the chunk size is chosen by measured time, so two calls may chunk differently: equal up to
    # float32 rounding of the passes (a batch's size changes the kernels' order of sums) ...
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # ... and bitwise with a fixed chunk
    fixed = [salience.smoothgrad(small_cnn, x, samples=4, seed=11, chunk=2) for _ in range(2)]
    assert torch.equal(fixed[0], fixed[1])
    assert not torch.allclose(a, salience.smoothgrad(small_cnn, x, samples=4, seed=12))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    c1 = salience.smoothgrad(small_cnn, x, samples=4, seed=None)
    c2 = salience.smoothgrad(small_cnn, x, samples=4, seed=None)
    assert not torch.equal(c1, c2)
    # fresh noise without touching the caller's RNG (torch.seed() re-seeded it non-deterministically)
    assert torch.equal(torch.get_rng_state(), state), "seed=None re-seeded the global RNG"


def _image_noise_loop(x: torch.Tensor, samples: int, noise: float, seed: int):
    """One image's noisy copies under a per-image seed: one N(0, 1) draw of shape (C, H, W) per
    copy, from a generator seeded with that image's int."""
    gen = torch.Generator().manual_seed(seed)
    sigma = noise * (x.max() - x.min())
    for _ in range(samples):
        yield x + sigma * torch.randn(x.shape, generator=gen)


@pytest.mark.parametrize("chunk", [2, 5])
def test_per_image_seeds_give_each_image_its_own_stream(small_cnn, chunk):
    x = _x(3)
    seeds = [7, 123_456_789, -4]
    with torch.no_grad():
        cls = small_cnn.eval()(x).argmax(1)
    got = salience.smoothgrad(small_cnn, x, samples=4, noise=0.2, seed=seeds, chunk=chunk, reduce=None)
    for b in range(3):
        ref = torch.stack([salience.vanilla(small_cnn, xs[None], cls[b:b + 1], reduce=None)[0]
                           for xs in _image_noise_loop(x[b], 4, 0.2, seeds[b])]).mean(0)
        torch.testing.assert_close(got[b], ref, rtol=1e-5, atol=1e-7)
        alone = salience.smoothgrad(small_cnn, x[b:b + 1], samples=4, noise=0.2, seed=[seeds[b]], chunk=chunk,
                                    reduce=None)
        torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-5, atol=1e-7)
        # one image's int seed is the same stream
        assert torch.equal(alone, salience.smoothgrad(small_cnn, x[b:b + 1], samples=4, noise=0.2, seed=seeds[b],
                                                      chunk=chunk, reduce=None))
    # whichever images share the batch: image 1 in another batch, in another place
    other = salience.smoothgrad(small_cnn, torch.stack([x[2], x[1]]), samples=4, noise=0.2, seed=[seeds[2], seeds[1]],
                                chunk=chunk, reduce=None)
    torch.testing.assert_close(other[1], got[1], rtol=1e-5, atol=1e-7)
    # a tensor of seeds is a list of seeds
    torch.testing.assert_close(salience.smoothgrad(small_cnn, x, samples=4, noise=0.2, seed=torch.tensor(seeds),
                                                   chunk=chunk, reduce=None), got, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed, msg", [
    ([1, 2], r"seed has 2 int\(s\) for a batch of 3 image\(s\)"),
    ([1, 2, 3, 4], r"seed has 4 int\(s\) for a batch of 3"),
    ([], r"seed has 0 int\(s\)"),
    ([1, 2.5, 3], r"seed\[1\] must be an int"),
    ([1, 2, True], r"seed\[2\] must be an int"),
    ([1, None, 3], r"seed\[1\] must be an int"),
    ([1, 2, 2 ** 64], r"seed\[2\] must be an int from -2\*\*63 to 2\*\*64 - 1"),
    ("123", "seed must be an int"),
    (torch.tensor([[1, 2, 3]]), "seed must be an int"),
])
def test_bad_per_image_seeds(small_cnn, seed, msg):
    with pytest.raises(SalienceError, match=msg):
        salience.smoothgrad(small_cnn, _x(3), samples=2, seed=seed)


def test_target_resolved_once_on_the_clean_image():
    # Two nearly tied classes: noisy copies often predict the other one.
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.linspace(-1, 1, 12), torch.linspace(1, -1, 12)]))
        model[1].bias.zero_()
    x = torch.full((1, 3, 2, 2), 0.5)
    x[0, 0, 0, 0] = 0.52
    clean = int(model(x).argmax(1))
    preds = [int(model(xs).argmax(1)) for xs in _noise_loop(x, 20, 0.5, seed=0)]
    assert 0 < preds.count(clean) < 20, "the case must have noisy copies predicting the other class"
    got = salience.smoothgrad(model, x, samples=20, noise=0.5, reduce=None)
    w = model[1].weight[clean].view(1, 3, 2, 2)
    torch.testing.assert_close(got, w.expand_as(got))


def test_several_targets_equal_separate_calls(small_cnn):
    x = _x(3)
    t = torch.tensor([[0, 1], [2, 3], [1, 1]])
    for method in (salience.vanilla, salience.guided_backprop):
        both = salience.smoothgrad(small_cnn, x, t, method=method, samples=4, reduce=None)
        assert both.shape == (3, 2, 3, 10, 10)
        for k in range(2):
            one = salience.smoothgrad(small_cnn, x, t[:, k], method=method, samples=4, reduce=None)
            torch.testing.assert_close(both[:, k], one, rtol=1e-5, atol=1e-7)
    reduced = salience.smoothgrad(small_cnn, x, [salience.targets.classes(1), 2], samples=3)
    assert reduced.shape == (3, 2, 10, 10)
    torch.testing.assert_close(reduced[:, 1], salience.smoothgrad(small_cnn, x, 2, samples=3))


def test_vanilla_several_targets_share_a_forward(small_cnn):
    calls = []
    h = small_cnn.register_forward_hook(lambda *a: calls.append(1))
    try:
        salience.smoothgrad(small_cnn, _x(2), torch.tensor([[0, 1, 2], [3, 2, 1]]), samples=5, chunk=2)
    finally:
        h.remove()
    assert len(calls) == 5  # 10 copies in chunks of 2; 3 targets each; no clean pass (classes given)
    calls.clear()
    h = small_cnn.register_forward_hook(lambda *a: calls.append(1))
    try:
        salience.smoothgrad(small_cnn, _x(2), samples=4, chunk=8)
    finally:
        h.remove()
    assert len(calls) == 2  # the clean pass that picks the class, then one pass of 8 copies


def test_model_unchanged_also_after_errors(small_cnn):
    x = _x(2)
    small_cnn.train()
    small_cnn.head.weight.grad = torch.ones_like(small_cnn.head.weight)
    with unchanged(small_cnn):
        salience.smoothgrad(small_cnn, x, samples=3, method=salience.guided_backprop)
        salience.smoothgrad(small_cnn, x, samples=3, method=salience.gradcam, progress=False)
    with unchanged(small_cnn), pytest.raises(SalienceError, match="out of range"):
        salience.smoothgrad(small_cnn, x, 9, samples=3)

    calls = []

    def interrupted(model, x, target, **kw):
        calls.append(1)
        if len(calls) == 2:  # in the middle of the run
            raise KeyboardInterrupt
        return salience.vanilla(model, x, target, **kw)

    with unchanged(small_cnn), pytest.raises(KeyboardInterrupt):
        salience.smoothgrad(small_cnn, x, samples=6, method=interrupted, chunk=4)
    assert len(calls) == 2


@pytest.mark.parametrize("kw, msg", [
    ({"samples": 0}, "samples must be an int >= 1"),
    ({"samples": 2.5}, "samples must be an int >= 1"),
    ({"noise": -0.1}, "noise must be a finite number >= 0"),
    ({"noise": float("nan")}, "noise must be a finite number >= 0"),
    ({"variant": "median"}, "variant must be one of"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"chunk": 0}, "chunk must be a positive int"),
    ({"max_memory": "lots"}, "cannot read max_memory"),
    ({"max_memory": -5}, "max_memory must be positive"),
    ({"reduce": "mean"}, "unknown reduce"),
    ({"layer": "features.2"}, "vanilla has no option 'layer'"),
    ({"method": "vanilla"}, "method must be a saliency function"),
])
def test_bad_input(small_cnn, kw, msg):
    with pytest.raises(SalienceError, match=msg):
        salience.smoothgrad(small_cnn, _x(1), **kw)


def test_progress_bar(small_cnn, capsys):
    salience.smoothgrad(small_cnn, _x(1), samples=3, progress=True)
    err = capsys.readouterr().err
    assert "smoothgrad" in err and "3/3" in err
    salience.smoothgrad(small_cnn, _x(1), samples=3)
    assert capsys.readouterr().err == ""


def test_a_target_free_method_is_the_mean_of_its_map_over_the_copies(small_cnn):
    """SmoothGrad of Eigen-CAM (issue 15): the mean over the noisy copies of each copy's first
    principal component of the layer's activations, written here as a loop with an SVD; several
    targets get that one map each, through the function and through the registry."""
    x = _x(2, 8)
    store = []
    small_cnn.eval()
    handle = small_cnn.features[3].register_forward_hook(lambda m, i, o: store.append(o.detach()))
    ref = torch.zeros(2, 8, 8, dtype=torch.float64)
    try:
        with torch.no_grad():
            for xc in _noise_loop(x, 5, 0.2, 3):
                store.clear()
                small_cnn(xc)
                m = store[0].double().flatten(2).transpose(1, 2)  # (B, h w, channels)
                v = torch.linalg.svd(m).Vh[:, 0]  # each image's first right-singular vector
                p = (m @ v.unsqueeze(-1)).squeeze(-1)
                flip = p.amin(1, keepdim=True).abs() > p.amax(1, keepdim=True).abs()  # largest magnitude > 0
                ref += torch.where(flip, -p, p).view(2, 8, 8)
    finally:
        handle.remove()
    ref /= 5
    with unchanged(small_cnn):
        out = salience.smoothgrad(small_cnn, x, method=salience.eigencam, samples=5, noise=0.2, seed=3,
                                  layer="features.3", chunk=4)
        k = salience.smoothgrad(small_cnn, x, torch.tensor([[0, 1, 2], [1, 2, 3]]), method=salience.METHODS["eigencam"],
                                samples=5, noise=0.2, seed=3, layer="features.3")
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-4)
    assert k.shape == (2, 3, 8, 8) and all(torch.allclose(k[:, j], out, atol=1e-6) for j in range(3))


def test_the_same_seed_is_the_same_noise_for_a_float64_input(small_cnn):
    """The noise is drawn in float32 whatever x's dtype: a float64 model and input get the float32
    run's noise (a float64 draw was another sample, so the two maps differed by the noise, not by
    rounding). A float32 draw cast to float64 is exact, so the maps agree to float32 rounding."""
    import copy

    x = _x()
    with torch.no_grad():
        cls = small_cnn.eval()(x).argmax(1)
    m32 = salience.smoothgrad(small_cnn, x, cls, samples=6, noise=0.3, seed=11)
    m64 = salience.smoothgrad(copy.deepcopy(small_cnn).double(), x.double(), cls, samples=6, noise=0.3, seed=11)
    assert m64.dtype == torch.float64
    torch.testing.assert_close(m64.float(), m32, rtol=1e-4, atol=1e-6)
