"""What the metrics do with inputs they cannot use: a model that cannot take ``x`` (issue: the metrics'
own model calls raised the model's raw RuntimeError), an image too small for the blurred substrate,
and one scale of probabilities per metric call."""
from __future__ import annotations

import re

import pytest
import torch

from salience import SalienceError
from salience import evidence as M
from salience.evidence import evaluate

from conftest import SmallCNN, unchanged


def _maps(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0))


# Every public function of salience.evidence that calls a model, with a target given (where the
# metrics ran the model without salience's rule) and with the predicted class (where they did not).
CALLS = {
    "deletion": lambda m, x, t: M.deletion(m, x, _maps(x), t, steps=2),
    "insertion": lambda m, x, t: M.insertion(m, x, _maps(x), t, steps=2),
    "deletion_curves": lambda m, x, t: M.deletion_curves(m, x, _maps(x), t, steps=2),
    "insertion_curves": lambda m, x, t: M.insertion_curves(m, x, _maps(x), t, steps=2),
    "faithfulness_correlation": lambda m, x, t: M.faithfulness_correlation(m, x, _maps(x), t, subsets=2),
    "road": lambda m, x, t: M.road(m, x, _maps(x), t, fractions=(0.5,)),
    "road_curves": lambda m, x, t: M.road_curves(m, x, _maps(x), t, fractions=(0.5,)),
    "max_sensitivity": lambda m, x, t: M.max_sensitivity(m, x, "vanilla", t, samples=1),
    "randomization": lambda m, x, t: M.randomization(m, x, "vanilla", t),
    "randomization_layers": lambda m, x, t: M.randomization_layers(m, x),
    "random_logit": lambda m, x, t: M.random_logit(m, x, "vanilla", t),
    "data_randomization": lambda m, x, t: M.data_randomization(lambda i, y: m, x, torch.arange(x.shape[0]), x,
                                                               "vanilla", t),
    "evaluate_methods": lambda m, x, t: evaluate.evaluate_methods(m, x, methods=["vanilla"], steps=2,
                                                                  baselines=False),
}


@pytest.mark.parametrize("target", [0, None])
@pytest.mark.parametrize("name", list(CALLS))
def test_a_model_that_cannot_take_x_is_a_clear_error_from_every_metric(name, target):
    """RGBA images into a 3-channel model: every metric raises the SalienceError the methods raise
    (salience._core.autograd.model_call: the input's shape, the channels the model takes, the
    conversion), the model's own error kept as the cause, the model unchanged. Deletion, insertion,
    ROAD and faithfulness correlation with a target given, and the randomization test's layer probe,
    raised the raw "expected input[6, 4, 8, 8] to have 3 channels" from inside the model before."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.rand(2, 4, 8, 8)
    with unchanged(model), pytest.raises(SalienceError) as info:
        CALLS[name](model, x, target)
    msg = str(info.value)
    assert re.search(r"\((1|2), 4, 8, 8\)", msg) and "takes 3 channels" in msg and "x[:, :3]" in msg, msg
    assert isinstance(info.value.__cause__, RuntimeError) and "\n" not in msg


@pytest.mark.parametrize("name", ["deletion", "faithfulness_correlation", "road", "randomization_layers"])
def test_a_vit_given_another_size_is_a_clear_error_from_the_metrics(name):
    """A ViT whose position embedding fixes its input size, given 32 x 32 images where it takes
    24 x 40: the metrics' own passes name the size it takes (a raw "must match the size of tensor"
    before)."""
    from tiny_vit import TinyViT

    from salience._core.info import ModelInfo, attach_info

    torch.manual_seed(0)
    model = attach_info(TinyViT(), ModelInfo(input_size=(24, 40)))
    with unchanged(model), pytest.raises(SalienceError, match=r"\(2, 3, 32, 32\).*takes 24 x 40 images"):
        CALLS[name](model, torch.rand(2, 3, 32, 32), 0)


# ------------------------------------------------------------- the blurred substrate of thin images
def _blur_ref(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """scipy's 1-D Gaussian (mirror = torch's reflect padding, cut at 3 sigma) along ``axis``."""
    ndimage = pytest.importorskip("scipy.ndimage")
    return torch.from_numpy(ndimage.gaussian_filter1d(x.double().numpy(), sigma, axis=axis, mode="mirror",
                                                      truncate=3.0))


@pytest.mark.parametrize("shape", [(1, 40), (40, 1)])
def test_deletion_of_a_one_pixel_thin_image_blurs_along_its_length(shape):
    """A 1 x W (or H x 1) image: the default substrate, the blur, was the image itself (the kernel was
    cut at the shorter side for both axes, to nothing), so the deletion curve was flat and its AUC
    meaningless, silently. Now the long axis is blurred: with a linear score ``sum(w * x)`` (raw
    output) the curve is, in closed form, ``sum(w * where(deleted, blur(x), x))``, the pixels deleted
    in the map's order, the blur scipy's 1-D Gaussian along the image's length."""
    from nets import LinearScore

    g = torch.Generator().manual_seed(0)
    h, w = shape
    x = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(1, 1, h, w, generator=g, dtype=torch.float64)
    maps = torch.randperm(2 * h * w, generator=g).reshape(2, h, w).double()  # distinct: one order
    model = LinearScore(weight).double()
    steps = 4
    with unchanged(model):
        curves = M.deletion_curves(model, x, maps, 0, steps=steps, probability=False)
    blur = _blur_ref(x, 5.0, axis=3 if h == 1 else 2)
    rank = maps.reshape(2, -1).argsort(1, descending=True).argsort(1).reshape(2, 1, h, w)
    ref = torch.stack([(weight * torch.where(rank < round(k * h * w / steps), blur, x)).sum((1, 2, 3))
                       for k in range(steps + 1)], 1)
    torch.testing.assert_close(curves.double(), ref, rtol=1e-5, atol=1e-5)
    assert (ref[:, 0] - ref[:, -1]).abs().min() > 1e-3  # not flat


def test_the_blur_of_a_short_side_does_not_shorten_the_other():
    """The kernel is cut at each axis's own size: a 2 x 40 image is blurred along its width by the full
    3-sigma Gaussian (it was cut to a radius of 1 there too, by the 2-pixel height). Rows that are equal
    stay equal through the height's blur, so the result is scipy's 1-D blur of the rows."""
    from salience._core.tensors import gaussian_blur

    row = torch.rand(1, 3, 1, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = row.expand(-1, -1, 2, -1).contiguous()
    torch.testing.assert_close(gaussian_blur(x, 5.0), _blur_ref(x, 5.0, axis=3))
    torch.testing.assert_close(gaussian_blur(x.transpose(2, 3), 5.0), _blur_ref(x, 5.0, axis=3).transpose(2, 3))


@pytest.mark.parametrize("call", ["deletion", "insertion", "faithfulness_correlation", "road"])
def test_a_one_pixel_image_is_refused_where_nothing_would_be_removed(call):
    """A 1 x 1 image: its blur and its mean are the image itself, and ROAD removes at most H * W - 1
    pixels; the curves were flat and every map scored the same, silently. A SalienceError says which
    substrate to take instead; the zero substrate still works."""
    from nets import LinearScore

    model = LinearScore(torch.ones(1, 1, 1, 1))
    x, maps = torch.rand(2, 1, 1, 1), torch.rand(2, 1, 1)
    fn = getattr(M, call)
    if call == "road":
        with pytest.raises(SalienceError, match="1 x 1 image has none to remove"):
            fn(model, x, maps, 0)
        return
    for substrate in ("blur", "mean"):
        with pytest.raises(SalienceError, match=rf"substrate='{substrate}' of a 1 x 1 image.*substrate='zero'"):
            fn(model, x, maps, 0, substrate=substrate)
    if call == "faithfulness_correlation":  # one pixel, every set the whole image: the correlation is undefined
        with pytest.raises(SalienceError, match="replaces all 1 pixels in every set"):
            fn(model, x, maps, 0, substrate="zero", subsets=2, subset_size=1.0)
        return
    fn(model, x, maps, 0, substrate="zero", steps=1)


# ------------------------------------------------------------- one scale of probabilities per call
class _BiasedScore(torch.nn.Module):
    """Raw logits ``[s + 1, s]``, ``s = sum(x)``: a 1 x 1 image of 1 gives ``[2, 1]``, one of 0 gives
    ``[1, 0]``, a row that is non-negative and sums to 1 though it is no probability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1)
        return torch.stack([s + 1, s], 1)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("target", [0, None])
def test_probabilities_are_judged_once_per_metric_call(batch_size, target):
    """Whether the model's rows already are probabilities was judged per model call: with
    ``batch_size=1`` the fully deleted image's raw row ``[1, 0]`` was kept as the probability 1 while
    the clean image's ``[2, 1]`` was softmaxed (0.731): two scales in one curve, and another curve with
    ``batch_size=2``. Judged once on the clean images, every point is the softmax: ``sigmoid(1)``."""
    model, x = _BiasedScore(), torch.ones(1, 1, 1, 2) * 0.5
    curve = M.deletion_curves(model, x, torch.tensor([[[1.0, 0.0]]]), target, steps=1, substrate="zero",
                              batch_size=batch_size)
    p = torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(curve, torch.stack([p, p]).view(1, 2))
    # A model ending in a softmax keeps its probabilities in every chunk (not softmaxed again).
    soft = torch.nn.Sequential(_BiasedScore(), torch.nn.Softmax(1))
    curve = M.deletion_curves(soft, x, torch.tensor([[[1.0, 0.0]]]), target, steps=1, substrate="zero",
                              batch_size=batch_size)
    torch.testing.assert_close(curve, torch.stack([p, p]).view(1, 2))
