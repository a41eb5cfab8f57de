"""A review of the render audit (merge 5cc9428): each test here failed before its fix. The audit's
new aspect-ratio check refused the maps of unpadded ("valid") convolutions on non-square images,
which lose the same border on both axes (a Keras tutorial's CNN: 52 x 28 on 224 x 128);
``save_png`` wrote PNG bytes under a ``.jpg`` name; ``figure`` had no size cap and drew a title
``None`` as "None" and a string's letters as titles; ``line_plot`` took any number of xticks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.render import viz

RNG = np.random.default_rng(0)


def _valid_cnn() -> nn.Module:
    """Keras's default ``padding="valid"``: conv 3x3, pool 2, conv 3x3, pool 2, conv 3x3, then a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("image_hw, map_hw", [((224, 128), (52, 28)), ((64, 128), (12, 28)), ((100, 37), (21, 5)),
                                              ((100, 300), (1, 8)), ((48, 37), (36, 25)), ((32, 48), (20, 36))],
                         ids=["keras-tutorial", "wide", "tall", "inception-v3", "valid-5x5-x3", "valid-small"])
def test_a_valid_convolution_map_fits_its_image(image_hw, map_hw):
    """Unpadded convolutions lose a border r on both axes, ``h = (H - r) / s``: the map is this image's
    (``gradcam``'s own upsampling stretches it so), and was refused as of another aspect ratio
    (inception-v3: Mixed_7c's 1 x 8 on 100 x 300; three valid 5x5 convolutions: 36 x 25 on 48 x 37).
    Its transpose stays refused."""
    img = np.full((*image_hw, 3), 90, np.uint8)
    m = RNG.random(map_hw)
    assert viz.overlay(img, m).shape == (*image_hw, 3)
    assert viz.figure(img, {"cam": m[None]}, labels=False).shape[:2] == (image_hw[0] + 8, 3 * image_hw[1] + 16)
    with pytest.raises(SalienceError, match="does not fit the image"):
        viz.overlay(img, m.T)


def test_gradcam_at_a_valid_layer_overlays_like_its_upsampled_map():
    """``gradcam(upsample=False)`` of a valid-conv CNN on a 100 x 37 image is 21 x 5; its overlay is the
    overlay of the map ``gradcam`` upsamples itself (both bilinear to the image), not a refusal."""
    model, x = _valid_cnn(), torch.rand(1, 3, 100, 37, generator=torch.Generator().manual_seed(1))
    small = salience.gradcam(model, x, 0, upsample=False, relu=False)
    assert small.shape == (1, 21, 5)
    img = viz.to_uint8_image(x[0])
    got = viz.overlay(img, small[0], norm="minmax")
    assert got.shape == (100, 37, 3)
    assert np.abs(got.astype(int) - viz.overlay(img, salience.gradcam(model, x, 0, relu=False)[0],
                                                norm="minmax").astype(int)).max() <= 4  # 3: the two bilinear resizes


def test_a_map_that_does_not_fit_says_how_to_draw_it_anyway():
    """The refusal names the way out for a map that is this image's after all: resize it to the image."""
    with pytest.raises(SalienceError, match=r"interpolate"):
        viz.overlay(np.zeros((24, 37, 3), np.uint8), RNG.random((8, 21)))


# ----------------------------------------------------------------------------- save_png's file name

@pytest.mark.parametrize("name", ["a.jpg", "a.jpeg", "a", "a.png.tmp", "a.webp"])
def test_save_png_refuses_a_name_of_another_format(name, tmp_path):
    """PNG bytes were written under a ``.jpg`` (or suffix-less) name: a file whose name says another
    format than it holds. Nothing is written."""
    with pytest.raises(SalienceError, match=r"save_png writes PNG files; give a file name ending in \.png"):
        viz.save_png(tmp_path / name, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SalienceError, match=r"ending in \.png"):
        viz.save_figure(tmp_path / name, np.zeros((4, 4, 3), np.uint8), {"m": np.zeros((1, 4, 4))})
    assert not list(tmp_path.iterdir())


def test_save_png_takes_png_in_any_case(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.PNG", "c.Png"):
        p = viz.save_png(str(tmp_path / name), np.zeros((4, 5, 3), np.uint8))
        assert Image.open(p).format == "PNG" and Image.open(p).size == (5, 4)


# ----------------------------------------------------------------------------- figure's size and labels

@pytest.mark.parametrize("options", [{"pad": 10_000}, {"scale_to": 100_000}, {"scale_to": (20_000, 20_000)}])
def test_figure_refuses_a_canvas_too_large_to_open(options):
    """``pad=10000`` asked numpy for a 3.6 GB canvas (``scale_to=100000``: the tiles alone, 30 GB) before
    anything was drawn; a figure over PIL's ``MAX_IMAGE_PIXELS`` (89 megapixels), which PIL warns
    about opening and refuses at twice that, is refused first, saying what to shrink."""
    img = np.zeros((6, 8, 3), np.uint8)
    with pytest.raises(SalienceError, match=r"the figure would be \d+ x \d+ pixels .*scale_to.*pad"):
        viz.figure(img, {"m": np.zeros((1, 6, 8))}, **options)


def test_a_wide_figure_under_the_cap_is_drawn():
    """A row of 41 tiles (20 methods, map and overlay) 224 pixels high: 9,352 pixels wide, far under
    the pixel cap (a side cap of 10,000 px would be near what ``salience explain --png`` draws for many methods)."""
    img = np.zeros((1, 224, 224, 3), np.uint8)
    maps = {f"m{i}": np.zeros((1, 7, 7)) for i in range(20)}
    assert viz.figure(img, maps, labels=False).shape == (224 + 8, 41 * 224 + 42 * 4, 3)


def test_figure_titles_none_is_no_title_and_a_string_is_not_its_letters():
    """``titles=[None]`` drew the word "None"; ``titles="gradcam"`` (one string) was split into letters,
    and refused as 7 titles for 1 method (``row_labels="cat"``: 3 labels for 3 images, drawn as c, a, t)."""
    img, m = np.zeros((3, 6, 8, 3), np.uint8), np.zeros((3, 6, 8))
    blank = viz.figure(img, {"m": m}, titles=[""])
    assert np.array_equal(viz.figure(img, {"m": m}, titles=[None]), blank)
    assert not np.array_equal(viz.figure(img, {"m": m}, titles=["None"]), blank)
    with pytest.raises(SalienceError, match=r"titles must be a list of strings \(one per method\), not one string"):
        viz.figure(img, {"m": m}, titles="gradcam")
    with pytest.raises(SalienceError, match=r"row_labels must be a list of strings \(one per image\), not one string"):
        viz.figure(img, {"m": m}, row_labels="cat")


def test_figure_row_labels_of_tensor_numbers_are_their_values():
    """``row_labels=labels`` (a tensor of classes) drew "tensor(3)"; a 0-d tensor or array is its value."""
    img, m = np.zeros((2, 6, 8, 3), np.uint8), np.zeros((2, 6, 8))
    assert np.array_equal(viz.figure(img, {"m": m}, row_labels=torch.tensor([3, 7])),
                          viz.figure(img, {"m": m}, row_labels=["3", "7"]))
    assert np.array_equal(viz.figure(img, {"m": m}, row_labels=np.array([3, 7])),
                          viz.figure(img, {"m": m}, row_labels=["3", "7"]))


# ----------------------------------------------------------------------------- line_plot's xticks

@pytest.mark.parametrize("xticks, message", [
    (["a", "b"], r"xticks: 2 labels for series 's' of 3 points; give one label per point"),
    ("abc", r"xticks must be a list of labels \(one per point\), not one string"),
    (5, r"xticks must be a list of labels \(one per point\), got int"),
])
def test_line_plot_checks_xticks(xticks, message):
    """Two labels for three points were spread over the axis, each at no point; a string's letters
    were the labels (3 of them, so drawn)."""
    from salience.render import plots

    with pytest.raises(SalienceError, match=message):
        plots.line_plot({"s": [0.1, 0.5, 0.9]}, xticks=xticks)


def test_line_plot_takes_an_array_of_xticks():
    """An array of labels was 'ambiguous' (``if xticks:``, numpy's ValueError); it is its labels."""
    from salience.render import plots

    got = plots.line_plot({"s": [0.1, 0.5, 0.9]}, xticks=np.array(["a", "b", "c"]))
    assert np.array_equal(got, plots.line_plot({"s": [0.1, 0.5, 0.9]}, xticks=["a", "b", "c"]))


# ----------------------------------------------------------------------------- channels-last refusal

def test_a_batch_of_narrow_maps_refused_as_channels_last_is_told_how_to_draw_them():
    """A batch of 5 CAMs of 300 x 20 images at stride 32 is ``(5, 10, 1)``: read as one channels-last
    map and refused (the rule cannot tell them apart), the message gave no way to draw the batch."""
    cams = RNG.random((5, 10, 1))
    for call in (viz.heatmap, viz.scale):
        with pytest.raises(SalienceError, match=r"a batch of maps 1 or 3 pixels wide .*one map at a time, m\[i\]"):
            call(cams)
    assert viz.heatmap(cams[0]).shape == (10, 1, 3)
