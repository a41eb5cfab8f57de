"""The picture API (``salience.render``: viz, plots, report) over the inputs a user passes: each call
draws the right picture, or raises a ``SalienceError`` saying what was expected and what to do. Each
test here failed before its fix: a raw ``NotImplementedError`` / ``TypeError`` / ``ValueError`` /
``ZeroDivisionError`` / ``OverflowError`` / ``MemoryError`` of torch, numpy or PIL, a numpy number
refused as "not a number" while ``True`` passed as one, a map of another aspect ratio stretched over
the image without a word, a reversed ``ylim`` drawing every point on one line, a string's letters
taken as a table's cells."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience.render import plots, report, viz

RNG = np.random.default_rng(0)
IMG = (RNG.random((6, 8, 3)) * 255).astype(np.uint8)  # (H, W, C) uint8
MAP = RNG.random((6, 8))


def _blend(image: np.ndarray, tile: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * tile.astype(np.float64)
    return np.floor(out + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- numbers

def test_numpy_numbers_are_numbers():
    """``alpha``, ``percentile``, ``pad`` and ``scale_to`` taken from numpy (``np.float32(0.25)``, a
    value read from an array) draw what the Python number draws; they were refused as 'not a number'."""
    got = viz.overlay(IMG, MAP, alpha=np.float32(0.25))
    assert np.array_equal(got, _blend(IMG, viz.heatmap(MAP), 0.25))  # the blend, by hand
    assert np.array_equal(viz.heatmap(MAP, percentile=np.int64(90)), viz.heatmap(MAP, percentile=90))
    assert np.array_equal(viz.scale(MAP, percentile=np.float64(90.0)), viz.scale(MAP, percentile=90))
    fig = viz.figure(IMG, {"m": MAP}, pad=np.int64(3), scale_to=np.int64(12), labels=False)
    assert np.array_equal(fig, viz.figure(IMG, {"m": MAP}, pad=3, scale_to=12, labels=False))
    assert fig.shape == (12 + 2 * 3, 3 * 16 + 4 * 3, 3)  # tiles 12 x 16 (8 * 12 / 6), pad 3 around


@pytest.mark.parametrize("call, message", [
    (lambda: viz.overlay(IMG, MAP, alpha=True), r"alpha must be a number in \[0, 1\].*got True"),
    (lambda: viz.heatmap(MAP, percentile=True), r"percentile must be a number in \(0, 100\], got True"),
    (lambda: viz.figure(IMG, {"m": MAP}, pad=True), r"pad must be an int >= 0.*got True"),
], ids=["alpha", "percentile", "pad"])
def test_a_bool_is_not_a_number(call, message):
    """``True`` was taken as 1: ``alpha=True`` drew the heatmap alone, ``percentile=True`` clipped at the
    1st percentile (a flat picture), ``pad=True`` 1 pixel."""
    with pytest.raises(SalienceError, match=message):
        call()


# ----------------------------------------------------------------------------- tensors without values

META = torch.empty(6, 8, device="meta")
SPARSE = torch.tensor(MAP, dtype=torch.float32).to_sparse()


@pytest.mark.parametrize("call", [
    lambda m: viz.heatmap(m), lambda m: viz.scale(m), lambda m: viz.constant_value(m),
    lambda m: viz.overlay(IMG, m), lambda m: viz.figure(IMG, {"m": m}), lambda m: viz.to_uint8_image(m),
    lambda m: viz.save_npy("never.npy", m),
], ids=["heatmap", "scale", "constant_value", "overlay", "figure", "to_uint8_image", "save_npy"])
@pytest.mark.parametrize("m, message", [(META, r"'meta' device, which holds no values"),
                                        (SPARSE, r"sparse tensor .*t.to_dense\(\)")], ids=["meta", "sparse"])
def test_a_tensor_without_dense_values_is_refused(call, m, message, tmp_path, monkeypatch):
    """A meta tensor (a model traced without data) and a sparse one: torch's raw 'Cannot copy out of
    meta tensor; no data!' / "can't convert Sparse layout tensor to numpy" before."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SalienceError, match=message):
        call(m)
    assert not list(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- map and image sizes

@pytest.mark.parametrize("hw", [(8, 6), (1, 200), (6, 3), (2, 8)], ids=["transposed", "strip", "half-wide", "flat"])
def test_a_map_of_another_aspect_ratio_is_refused(hw):
    """A map that no one scale takes to the image (a transposed map, another image's map) was
    stretched over it silently, each value drawn on other pixels."""
    m = RNG.random(hw)
    with pytest.raises(SalienceError, match=rf"the map of {hw[0]} x {hw[1]} does not fit the image of 6 x 8"):
        viz.overlay(IMG, m)
    with pytest.raises(SalienceError, match=rf"map 'cam' of {hw[0]} x {hw[1]} does not fit the image of 6 x 8"):
        viz.figure(IMG, {"cam": m})


@pytest.mark.parametrize("image_hw, map_hw", [((6, 8), (3, 4)), ((6, 8), (1, 1)), ((6, 8), (12, 16)),
                                              ((224, 300), (7, 10)), ((224, 224), (14, 14))])
def test_a_low_resolution_map_of_the_image_still_fits(image_hw, map_hw):
    """A CAM at a layer's resolution (7 x 10 on 224 x 300: a stride of 32, rounded up) is upsampled
    as before: the overlay of a constant map is the blend with its one colour."""
    img = np.full((*image_hw, 3), 100, np.uint8)
    m = np.zeros(map_hw)
    m[0, 0] = 1.0
    assert viz.overlay(img, m).shape == (*image_hw, 3)
    flat = viz.overlay(img, np.full(map_hw, 0.5), alpha=0.5, norm=None)
    assert np.array_equal(flat, _blend(img, np.broadcast_to(viz.colormap("fire")[128], img.shape), 0.5))


def test_figure_images_of_different_sizes_are_refused():
    """Was numpy's raw 'all input arrays must have the same shape'."""
    with pytest.raises(SalienceError, match=r"share one size, got \[\(6, 8\), \(8, 8\)\].*resize them"):
        viz.figure([IMG, RNG.random((3, 8, 8))], {"m": RNG.random((2, 6, 8))})


# ----------------------------------------------------------------------------- plots

@pytest.mark.parametrize("args, message", [
    ((0, 1, 0), r"target must be an int from 1 to 1000"),           # ZeroDivisionError
    ((0, 1, -3), r"target must be an int from 1 to 1000"),          # math domain error
    ((0, 1, 10 ** 9), r"target must be an int from 1 to 1000"),     # MemoryError
    ((0, 1, True), r"target must be an int"),
    ((0, float("inf"), 6), r"hi must be a finite number, got inf"),  # OverflowError
    ((float("nan"), 1, 6), r"lo must be a finite number, got nan"),  # [nan]
    ((-1e308, 1e308, 6), r"too wide"),                               # OverflowError
    (("0", "1", 6), r"lo must be a finite number, got '0'"),         # TypeError
])
def test_nice_ticks_refuses(args, message):
    with pytest.raises(SalienceError, match=message):
        plots.nice_ticks(*args)


def test_nice_ticks_takes_numpy_and_tensor_numbers():
    assert plots.nice_ticks(np.float32(0), torch.tensor(1.0)) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


S = {"a": [0.1, 0.5, 0.9]}


@pytest.mark.parametrize("series, options, message", [
    (S, {"ylim": (0, 0)}, r"low < high"),              # ZeroDivisionError
    (S, {"ylim": (1, 0)}, r"low < high"),              # every point drawn at one height
    (S, {"ylim": (0, float("nan"))}, r"ylim's high must be a finite number"),
    (S, {"ylim": 1}, r"ylim must be \(low, high\)"),
    (S, {"size": (10, 10)}, r"size must be \(width, height\) in pixels, at least \(240, 120\)"),
    (S, {"size": (520.5, 340)}, r"size must be \(width, height\)"),
    (S, {"size": (100_000, 100_000)}, r"at most 10000 a side"),   # 30 GB asked of PIL
    (S, {"title": None}, r"title must be a string, got NoneType"),
    (S, {"xlabel": 3}, r"xlabel must be a string"),
    (None, {}, r"series must be a mapping"),
    ([[0.1, 0.2]], {}, r"series must be a mapping"),
    ({"a": np.zeros((2, 2))}, {}, r"series 'a' must be one sequence of numbers \(1-D\)"),
    ({"a": ["x"]}, {}, r"series 'a' must be a sequence of numbers"),
    ({"a": 0.5}, {}, r"series 'a' must be one sequence"),
])
def test_line_plot_refuses(series, options, message):
    with pytest.raises(SalienceError, match=message):
        plots.line_plot(series, **options)


def test_line_plot_draws_tensors_and_generators_as_lists():
    ref = plots.line_plot({"a": [0.25, 0.5]})
    assert np.array_equal(plots.line_plot({"a": torch.tensor([0.25, 0.5], requires_grad=True)}), ref)
    assert np.array_equal(plots.line_plot({"a": (v for v in (0.25, 0.5))}), ref)


def test_side_by_side():
    a, b = plots.line_plot(S), plots.line_plot(S, size=(300, 340))
    assert np.array_equal(plots.side_by_side(a, b), np.concatenate([a, b], axis=1))
    for bad, message in [((), r"at least one picture"), ((a, a[:10]), r"one height, got heights \[340, 10\]"),
                         ((a, a.astype(np.float32)), r"picture 1 is a ndarray .* dtype float32"),
                         ((a, np.dstack([a, a[..., :1]])), r"picture 1 .*\(340, 520, 4\)"),
                         (([a, a],), r"picture 0 is a list")]:
        with pytest.raises(SalienceError, match=message):
            plots.side_by_side(*bad)


# ----------------------------------------------------------------------------- report

@pytest.mark.parametrize("build, message", [
    (lambda r: r.heading(3), r"heading must be a string, got int 3"),
    (lambda r: r.paragraph(None), r"paragraph must be a string, got NoneType"),
    (lambda r: r.paragraph("x", css=1), r"css must be a string"),
    (lambda r: r.figure("a.png", 3), r"caption must be a string"),
    (lambda r: r.figure(None), r"the figure's image must be a path"),
    (lambda r: r.figure("a.png", width="x"), r"width must be a number of pixels"),
    (lambda r: r.figure("a.png", width=-5), r"width must be a number of pixels"),
    (lambda r: r.table(["a"], 3), r"rows must be a list of rows"),
    (lambda r: r.table(["a"], [3]), r"row 0 must be a list of cells, got int"),
    (lambda r: r.table("ab", [[1, 2]]), r"header must be a list of cells, got str"),
    (lambda r: r.raw(None), r"fragment must be a string"),
    (lambda r: r.render(None), r"base must be a path"),
    (lambda r: r.write(None), r"path must be a path"),
    (lambda r: r.write(b"index.html"), r"path must be a path"),
    (lambda r: report.Report(3), r"title must be a string"),
    (lambda r: report.Report("t", 3), r"subtitle must be a string"),
])
def test_report_refuses_what_it_cannot_write(build, message, tmp_path, monkeypatch):
    """Raw AttributeError ('int' object has no attribute 'replace'), TypeError, ValueError before; a
    negative width and ``raw(None)`` went into the page as they were, a string's letters became cells."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SalienceError, match=message):
        build(report.Report("t"))
    assert not list(tmp_path.iterdir())


def test_report_writes_unicode_paths_and_escapes(tmp_path):
    page = report.Report("é <b>").figure(tmp_path / "ñ 🐱" / "a.png", "c<").table(("x",), [(1,)])
    out = page.write(tmp_path / "ñ" / "index.html")
    text = out.read_text("utf-8")
    assert "<title>é &lt;b&gt;</title>" in text and 'src="../%s/a.png"' % "ñ 🐱" in text
    assert "<td>1</td>" in text


@pytest.mark.parametrize("call", [viz.heatmap, viz.scale, viz.grayscale], ids=["heatmap", "scale", "grayscale"])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_channels_last_map_is_refused(call, channels):
    """A Keras-layout ``(H, W, 1)`` / ``(H, W, 3)`` map (keras-vis's ``keepdims=True``) was read as a
    batch of H maps 1 or 3 pixels wide (heatmap: a ``(6, 8, 1, 3)`` "picture"; scale: each row
    scaled on its own) or as H channels (grayscale: an ``(8, 1, 3)`` picture)."""
    m = RNG.random((6, 8, channels))
    with pytest.raises(SalienceError, match=r"looks channels-last \(H, W, C\).*m\[\.\.\., 0\].*transpose\(2, 0, 1\)"):
        call(m)
    if channels == 1:  # what the message says to do draws the one map
        assert np.array_equal(viz.heatmap(m[..., 0]), viz.heatmap(np.ascontiguousarray(m[..., 0])))
    else:
        assert viz.grayscale(m.transpose(2, 0, 1)).shape == (6, 8, 3)
