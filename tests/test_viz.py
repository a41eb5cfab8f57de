"""Pictures on known arrays: which colour each value gets, centring of signed maps, scaling,
overlays, the figure's layout, files, and tensors vs numpy."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from salience import SalienceError
from salience.render import viz


def ramp(h: int = 10, w: int = 10) -> np.ndarray:
    return np.arange(h * w, dtype=np.float64).reshape(h, w) / (h * w - 1)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


# ----------------------------------------------------------------------------- colormaps


def test_colormaps_are_256_rgb_tables():
    for name in viz.COLORMAPS:
        lut = viz.colormap(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
    with pytest.raises(SalienceError, match="unknown colormap 'jet'.*fire"):
        viz.colormap("jet")


def test_sequential_maps_brighten_monotonically():
    for name in ("fire", "gray"):
        lum = luminance(viz.colormap(name))
        assert np.all(np.diff(lum) > 0), name
    assert np.array_equal(viz.colormap("gray"), np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1))


def test_diverging_map_is_symmetric_with_white_middle():
    lut = viz.colormap("bwr")
    assert lut[127].tolist() == lut[128].tolist() == [255, 255, 255]
    k = np.arange(128)
    assert np.array_equal(lut[127 - k], lut[128 + k][:, ::-1])   # mirror: red <-> blue
    assert lut[255, 0] > lut[255, 2] and lut[0, 2] > lut[0, 0]    # top red, bottom blue


def test_colormap_returns_a_copy():
    viz.colormap("fire")[:] = 0
    assert viz.colormap("fire")[255].sum() > 0


# ----------------------------------------------------------------------------- heatmap


@pytest.mark.parametrize("norm", ["percentile", "minmax"])
@pytest.mark.parametrize("cmap", ["fire", "gray"])
def test_max_pixel_gets_top_colour_and_min_bottom(norm, cmap):
    m = ramp()
    rgb = viz.heatmap(m, cmap=cmap, norm=norm)
    lut = viz.colormap(cmap)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[9, 9].tolist() == lut[255].tolist()
    assert rgb[0, 0].tolist() == lut[0].tolist()


def test_unsigned_minmax_is_exact_lut_lookup():
    m = 3.0 + 2.0 * ramp(16, 16)                     # offset and scale do not matter
    idx = np.floor(ramp(16, 16) * 255 + 0.5).astype(int)
    assert np.array_equal(viz.heatmap(m, norm="minmax"), viz.colormap("fire")[idx])


def test_default_cmap_is_fire_unsigned_bwr_signed():
    assert np.array_equal(viz.heatmap(ramp()), viz.heatmap(ramp(), cmap="fire"))
    m = ramp() - 0.5
    assert np.array_equal(viz.heatmap(m), viz.heatmap(m, cmap="bwr"))


def test_signed_zero_is_middle_colour_and_opposites_mirror():
    lut = viz.colormap("bwr")
    m = np.array([[0.0, 0.5, -0.5], [2.0, -2.0, 1.0], [-1.0, 0.25, -0.25]])
    rgb = viz.heatmap(m, norm="minmax")
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == lut[255].tolist() and rgb[1, 1].tolist() == lut[0].tolist()
    for pos, neg in [((0, 1), (0, 2)), ((1, 2), (2, 0)), ((2, 1), (2, 2))]:
        assert rgb[pos].tolist() == rgb[neg][::-1].tolist()
        assert rgb[pos].tolist() != [255, 255, 255]


def test_signed_scale_is_symmetric_not_minmax():
    """Values in [-1, 3]: 0 stays white (not the minmax middle, 1), -1 is a third of the way down."""
    m = np.array([[-1.0, 0.0, 3.0]])
    v = viz.scale(m, "minmax")
    np.testing.assert_allclose(v, [[-1 / 3, 0.0, 1.0]])
    rgb = viz.heatmap(m, norm="minmax")
    lut = viz.colormap("bwr")
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == lut[127 - round(127 / 3)].tolist()


def test_signed_can_be_forced():
    m = ramp()                                        # no negatives
    rgb = viz.heatmap(m, signed=True, norm="minmax")
    lut = viz.colormap("bwr")
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[9, 9].tolist() == lut[255].tolist()
    v = viz.scale(ramp() - 0.5, "minmax", signed=False)
    assert v.min() == 0.0 and v.max() == 1.0


def test_percentile_clip_keeps_the_rest_visible_minmax_does_not():
    m = ramp(100, 100)
    m[0, 0] = 1e6                                     # one huge outlier
    rest = np.ones_like(m, dtype=bool)
    rest[0, 0] = False
    p = viz.scale(m, "percentile")
    mm = viz.scale(m, "minmax")
    assert p[0, 0] == 1.0 and p[rest].min() == 0.0 and p[rest].max() >= 0.99
    assert mm[rest].max() < 1e-5                       # washed out: everything but one pixel is black
    assert len(np.unique(viz.heatmap(m)[rest], axis=0)) > 200
    assert len(np.unique(viz.heatmap(m, norm="minmax")[rest], axis=0)) == 1


def test_percentile_falls_back_to_max_for_sparse_maps():
    """A map that is zero except for a few pixels (99th percentile = 0) still shows them."""
    m = np.zeros((20, 20))
    m[3, 4] = 5.0
    assert viz.scale(m)[3, 4] == 1.0 and viz.scale(-m)[3, 4] == -1.0


def test_constant_and_zero_maps():
    assert np.all(viz.scale(np.full((4, 4), 7.0)) == 0)
    z = viz.heatmap(np.zeros((4, 4)), signed=True)
    assert np.all(z == 255)                           # all white: zero is the middle


def test_scale_is_per_image_in_a_batch():
    b = np.stack([ramp(), 100 * ramp() + 5])
    v = viz.scale(b, "minmax")
    np.testing.assert_allclose(v[0], v[1])
    assert np.array_equal(viz.heatmap(b)[1], viz.heatmap(b[1]))


def test_norm_none_uses_values_as_they_are_and_refuses_out_of_range():
    m = np.array([[0.0, 0.5, 1.0]])
    lut = viz.colormap("fire")
    assert viz.heatmap(m, norm=None).tolist() == [lut[[0, 128, 255]].tolist()]
    assert viz.heatmap(m / 2, norm=None)[0, 2].tolist() == lut[128].tolist()   # not stretched
    s = viz.heatmap(np.array([[-1.0, 0.0, 1.0]]), norm=None)
    assert s[0, 1].tolist() == [255, 255, 255]
    with pytest.raises(SalienceError, match=r"norm=None needs map values in \[0, 1\].*1.5"):
        viz.heatmap(np.array([[0.0, 1.5]]), norm=None)
    with pytest.raises(SalienceError, match=r"\[-1, 1\]"):
        viz.heatmap(np.array([[-2.0, 1.0]]), norm=None)


def test_custom_lut():
    lut = np.zeros((256, 3), np.uint8)
    lut[:, 1] = np.arange(256)
    rgb = viz.heatmap(ramp(), cmap=lut, norm="minmax")
    assert rgb[9, 9].tolist() == [0, 255, 0]
    with pytest.raises(SalienceError, match=r"\(256, 3\) uint8"):
        viz.heatmap(ramp(), cmap=np.zeros((10, 3)))


# ----------------------------------------------------------------------------- colored / grayscale


def test_colored_red_channel_gradient_is_red():
    m = np.zeros((3, 6, 6))
    m[0] = ramp(6, 6)
    rgb = viz.colored(m)
    assert rgb.shape == (6, 6, 3)
    assert np.all(rgb[..., 1:] == 0) and rgb[5, 5, 0] == 255 and rgb[0, 0, 0] == 0
    assert np.array_equal(viz.colored(m[[2, 1, 0]])[..., 2], rgb[..., 0])   # blue channel -> blue


def test_colored_keeps_hue_and_centres_signed_at_gray():
    m = np.zeros((3, 2, 2))
    m[0], m[1] = 1.0, 0.5                             # orange everywhere: channels scaled together
    m[:, 0, 0] = 0
    assert viz.colored(m, norm="minmax")[1, 1].tolist() == [255, 128, 0]
    s = np.zeros((3, 2, 2))
    s[0, 0, 0], s[0, 1, 1] = 1.0, -1.0
    rgb = viz.colored(s, norm="minmax")
    assert rgb[0, 1].tolist() == [128, 128, 128]      # zero: mid-gray
    assert rgb[0, 0].tolist() == [255, 128, 128] and rgb[1, 1].tolist() == [0, 128, 128]


def test_grayscale_is_sum_of_magnitudes():
    m = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    g = viz.grayscale(m, norm="minmax")
    assert g.shape == (2, 8, 8, 3)
    assert np.all(g[..., 0] == g[..., 1]) and np.all(g[..., 1] == g[..., 2])
    assert np.array_equal(g, viz.heatmap(np.abs(m).sum(1), cmap="gray", norm="minmax"))
    with pytest.raises(SalienceError, match="heatmap"):
        viz.grayscale(ramp())


# ----------------------------------------------------------------------------- images and overlays


def test_to_uint8_image_layouts():
    rng = np.random.default_rng(1)
    f = rng.random((3, 5, 7))
    hwc = viz.to_uint8_image(f)
    assert hwc.shape == (5, 7, 3)
    assert np.array_equal(hwc, np.floor(f.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
    assert np.array_equal(viz.to_uint8_image(hwc), hwc)
    gray = viz.to_uint8_image(f[:1])
    assert np.array_equal(gray[..., 0], gray[..., 2]) and np.array_equal(gray[..., 0], hwc[..., 0])
    assert viz.to_uint8_image(torch.rand(2, 3, 4, 4)).shape == (2, 4, 4, 3)
    assert viz.to_uint8_image(torch.zeros(4, 6, 6)).shape == (6, 6, 3)              # RGBA: alpha dropped
    with pytest.raises(SalienceError, match=r"\[0, 1\].*unnormalize"):
        viz.to_uint8_image(torch.full((3, 4, 4), 2.5))
    with pytest.raises(SalienceError, match="NaN"):
        viz.to_uint8_image(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(SalienceError, match="1, 3 or 4 channels"):
        viz.to_uint8_image(np.zeros((5, 6, 7)))


def test_overlay_alpha_zero_is_image_and_one_is_heatmap():
    rng = np.random.default_rng(2)
    img = rng.random((3, 8, 8))
    m = rng.normal(size=(8, 8))
    assert np.array_equal(viz.overlay(img, m, alpha=0.0), viz.to_uint8_image(img))
    assert np.array_equal(viz.overlay(img, m, alpha=1.0), viz.heatmap(m))
    half = viz.overlay(img, m, alpha=0.5).astype(int)
    expect = (viz.to_uint8_image(img).astype(int) + viz.heatmap(m).astype(int)) / 2
    assert np.abs(half - expect).max() <= 0.5
    with pytest.raises(SalienceError, match="alpha"):
        viz.overlay(img, m, alpha=1.5)


def test_overlay_upsamples_low_res_cam():
    img = np.zeros((16, 16, 3), np.uint8)
    cam = np.zeros((4, 4))
    cam[:, :2] = 1.0                                  # left half hot
    out = viz.overlay(img, cam, alpha=1.0, norm="minmax")
    top, bottom = viz.colormap("fire")[[255, 0]]
    assert out.shape == (16, 16, 3)
    assert (out[:, :6] == top).all() and (out[:, 10:] == bottom).all()


def test_overlay_batch():
    imgs = torch.rand(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    out = viz.overlay(imgs, maps, alpha=0.3)
    assert out.shape == (3, 8, 8, 3)
    assert np.array_equal(out[1], viz.overlay(imgs[1], maps[1], alpha=0.3))
    with pytest.raises(SalienceError, match="batch of B images"):
        viz.overlay(imgs, maps[:2])


# ----------------------------------------------------------------------------- figure


def tile(fig: np.ndarray, r: int, c: int, h: int, w: int, pad: int = 4, top: int = 0, left: int = 0) -> np.ndarray:
    y, x = top + pad + r * (h + pad), left + pad + c * (w + pad)
    return fig[y:y + h, x:x + w]


def test_figure_layout_and_tiles():
    rng = np.random.default_rng(3)
    images = rng.random((2, 3, 12, 10))
    maps = {"a": rng.random((2, 12, 10)), "b": rng.normal(size=(2, 12, 10))}
    fig = viz.figure(images, maps, labels=False)
    assert fig.shape == (2 * 12 + 3 * 4, 5 * 10 + 6 * 4, 3) and fig.dtype == np.uint8
    for r in range(2):
        assert np.array_equal(tile(fig, r, 0, 12, 10), viz.to_uint8_image(images[r]))
        assert np.array_equal(tile(fig, r, 1, 12, 10), viz.heatmap(maps["a"])[r])
        assert np.array_equal(tile(fig, r, 2, 12, 10), viz.overlay(images[r], maps["a"][r]))
        assert np.array_equal(tile(fig, r, 3, 12, 10), viz.heatmap(maps["b"])[r])
        assert np.array_equal(tile(fig, r, 4, 12, 10), viz.overlay(images[r], maps["b"][r]))
    assert np.all(fig[:4] == 255) and np.all(fig[:, :4] == 255)          # white border

    no_ov = viz.figure(images, maps, labels=False, overlay=False)
    assert no_ov.shape == (2 * 12 + 3 * 4, 3 * 10 + 4 * 4, 3)
    assert np.array_equal(tile(no_ov, 1, 2, 12, 10), viz.heatmap(maps["b"])[1])


def test_figure_labels_add_a_header_and_a_margin():
    images = torch.rand(2, 3, 16, 16)
    maps = {"vanilla": torch.rand(2, 16, 16)}
    plain = viz.figure(images, maps, labels=False)
    fig = viz.figure(images, maps)
    header = fig.shape[0] - plain.shape[0]
    assert fig.shape[1] == plain.shape[1] and 8 <= header <= 30
    assert (fig[:header] < 128).any()                                      # text was drawn
    assert np.array_equal(fig[header:], plain)
    rows = viz.figure(images, maps, row_labels=["cat", "dog"])
    left = rows.shape[1] - fig.shape[1]
    assert left > 0 and rows.shape[0] == fig.shape[0]
    assert np.array_equal(rows[header:, left:], plain)
    assert (rows[header:, :left] < 128).any()
    with pytest.raises(SalienceError, match="row_labels: expected 2"):
        viz.figure(images, maps, row_labels=["x"])
    with pytest.raises(SalienceError, match="titles: expected 1"):
        viz.figure(images, maps, titles=["x", "y"])


def test_figure_maps_of_other_shapes():
    images = torch.rand(2, 3, 16, 16)
    cam = torch.zeros(2, 4, 4)
    cam[:, :, :2] = 1
    col = torch.zeros(2, 3, 16, 16)
    col[:, 0] = torch.rand(2, 16, 16)
    fig = viz.figure(images, {"cam": cam, "colored": col, "one": torch.rand(2, 1, 16, 16)}, labels=False,
                     overlay=False)
    assert fig.shape == (2 * 16 + 12, 4 * 16 + 20, 3)
    top = viz.colormap("fire")[255]
    assert (tile(fig, 0, 1, 16, 16)[:, :6] == top).all()                   # upsampled CAM
    red = tile(fig, 1, 2, 16, 16)
    assert np.array_equal(red, viz.colored(col[1])) and (red[..., 1:] == 0).all()
    with pytest.raises(SalienceError, match="B = 2"):
        viz.figure(images, {"x": torch.rand(3, 16, 16)})
    with pytest.raises(SalienceError, match="NaN"):
        viz.figure(images, {"x": torch.full((2, 16, 16), float("nan"))})


def test_figure_scale_to_enlarges_tiles_without_smoothing():
    images = np.random.default_rng(4).random((1, 3, 4, 4))
    maps = {"m": np.random.default_rng(5).random((1, 4, 4))}
    fig = viz.figure(images, maps, labels=False, scale_to=12, pad=0)
    assert fig.shape == (12, 36, 3)
    assert np.array_equal(fig[:, :12], np.kron(viz.to_uint8_image(images[0]), np.ones((3, 3, 1), np.uint8)))
    assert viz.figure(images, maps, labels=False, scale_to=(8, 20), pad=0).shape == (8, 60, 3)
    with pytest.raises(SalienceError, match="scale_to"):
        viz.figure(images, maps, scale_to=0)


def test_figure_of_images_only():
    images = torch.rand(3, 3, 8, 8)
    fig = viz.figure(images, {}, labels=False)
    assert fig.shape == (3 * 8 + 16, 8 + 8, 3)


# ----------------------------------------------------------------------------- files


def test_png_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(6)
    for shape in [(7, 9, 3), (7, 9), (7, 9, 4)]:
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        p = viz.save_png(tmp_path / "sub" / "x.png", a)
        assert np.array_equal(np.asarray(Image.open(p)), a)
    assert os.listdir(tmp_path / "sub") == ["x.png"]
    t = torch.rand(3, 5, 5)
    viz.save_png(tmp_path / "t.png", t)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t.png")), viz.to_uint8_image(t))
    with pytest.raises(SalienceError, match="one picture per file"):
        viz.save_png(tmp_path / "b.png", np.zeros((2, 4, 4, 3), np.uint8))


def test_save_npy_and_figure(tmp_path):
    m = torch.randn(2, 5, 5)
    p = viz.save_npy(tmp_path / "m.npy", m)
    assert np.array_equal(np.load(p), m.numpy())
    viz.save_npy(tmp_path / "h.npy", m.to(torch.bfloat16))
    assert np.load(tmp_path / "h.npy").dtype == np.float32
    images = torch.rand(2, 3, 5, 5)
    f = viz.save_figure(tmp_path / "f.png", images, {"m": m}, norm="minmax")
    assert np.array_equal(np.asarray(Image.open(f)), viz.figure(images, {"m": m}, norm="minmax"))
    assert sorted(os.listdir(tmp_path)) == ["f.png", "h.npy", "m.npy"]


# ----------------------------------------------------------------------------- tensors vs numpy


def test_tensor_and_numpy_give_identical_pictures():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 8, 8, generator=g)
    maps = torch.randn(2, 8, 8, generator=g)
    col = torch.randn(2, 3, 8, 8, generator=g)
    n_images, n_maps, n_col = images.numpy(), maps.numpy(), col.numpy()
    assert np.array_equal(viz.heatmap(maps), viz.heatmap(n_maps))
    assert np.array_equal(viz.colored(col), viz.colored(n_col))
    assert np.array_equal(viz.grayscale(col), viz.grayscale(n_col))
    assert np.array_equal(viz.overlay(images[0], maps[0]), viz.overlay(n_images[0], n_maps[0]))
    assert np.array_equal(viz.figure(images, {"m": maps, "c": col}), viz.figure(n_images, {"m": n_maps, "c": n_col}))
    assert np.array_equal(viz.scale(maps.requires_grad_()), viz.scale(n_maps))   # grad-tracking tensors too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors():
    m = torch.randn(2, 8, 8)
    assert np.array_equal(viz.heatmap(m.cuda()), viz.heatmap(m))


# ----------------------------------------------------------------------------- bad input


def test_bad_maps_give_clear_errors():
    with pytest.raises(SalienceError, match="NaN or infinite"):
        viz.heatmap(np.array([[0.0, np.inf]]))
    with pytest.raises(SalienceError, match=r"\(H, W\) or a batch.*colored"):
        viz.heatmap(np.zeros((2, 3, 4, 4)))
    with pytest.raises(SalienceError, match=r"\(3, H, W\)"):
        viz.colored(np.zeros((4, 5, 5)))
    with pytest.raises(SalienceError, match="norm must be"):
        viz.heatmap(ramp(), norm="zscore")
    with pytest.raises(SalienceError, match="percentile must be"):
        viz.heatmap(ramp(), percentile=0)
    with pytest.raises(SalienceError, match="empty"):
        viz.heatmap(np.zeros((0, 4)))
    with pytest.raises(SalienceError, match="real numbers"):
        viz.heatmap(np.array([["a", "b"]]))
    with pytest.raises(SalienceError, match="mapping"):
        viz.figure(torch.rand(1, 3, 4, 4), [torch.rand(1, 4, 4)])  # type: ignore[arg-type]


def test_unsigned_scaling_agrees_with_reduce_normalize():
    """The same rule in both places (one implementation: salience._core.tensors.unit_scale)."""
    from salience import reduce

    m = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(8)) ** 3
    for mode in ("percentile", "minmax"):
        np.testing.assert_allclose(viz.scale(m, mode), reduce.normalize(m, mode=mode).double().numpy(), atol=1e-6)



@pytest.mark.parametrize("mode", ["minmax", "percentile"])
def test_reduce_normalize_and_unsigned_scale_agree_on_random_constant_and_sparse_maps(mode):
    from salience import reduce

    g = torch.Generator().manual_seed(11)
    sparse = torch.zeros(2, 20, 20, dtype=torch.float64)      # mostly zero: the 99th percentile is the minimum
    sparse[0, 3, 4] = 5.0
    sparse[1, 1, 1], sparse[1, 7, 2], sparse[1, 9, 9] = 2.0, 1.0, 0.5
    cases = {
        "random": torch.rand(3, 17, 13, generator=g, dtype=torch.float64) ** 3,
        "random per-channel": torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64),
        "signed values, unsigned scaling": torch.randn(2, 9, 9, generator=g, dtype=torch.float64),
        "constant": torch.full((2, 5, 5), 7.0, dtype=torch.float64),
        "sparse": sparse,
        "tiny span": 1e-14 * torch.rand(2, 8, 8, generator=g, dtype=torch.float64),
    }
    for name, m in cases.items():
        v = viz.scale(m, mode, signed=False)
        n = reduce.normalize(m, mode=mode)
        assert n.dtype == torch.float64
        assert np.array_equal(v, n.numpy()), name                   # float64: the same numbers exactly
        np.testing.assert_allclose(reduce.normalize(m.float(), mode=mode).numpy(), v, atol=1e-6, err_msg=name)
        assert v.min() >= 0.0 and v.max() <= 1.0, name
    assert np.all(viz.scale(cases["constant"], mode, signed=False) == 0)
    s = reduce.normalize(sparse, mode=mode)
    assert s[0, 3, 4] == 1.0 and s[1, 1, 1] == 1.0 and s[1, 7, 2] == 0.5 and s[1, 9, 9] == 0.25  # still shown
    assert float(s[0].sum()) == 1.0
    t = reduce.normalize(cases["tiny span"], mode="minmax")
    assert float(t.amin()) == 0.0 and float(t.amax()) == 1.0      # scale-free: no floor on the span by default


def test_reduce_normalize_dtypes_and_eps():
    from salience import reduce

    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    assert reduce.normalize(m.half()).dtype == torch.float16
    assert reduce.normalize(m.to(torch.int64)).dtype == torch.float32          # not cast back to integers
    torch.testing.assert_close(reduce.normalize(m.to(torch.int64)), m / 4)
    torch.testing.assert_close(reduce.normalize(1e-13 * m, eps=1e-12), 1e-13 * m / 1e-12)  # span floored at eps

def test_figure_signed_column_is_diverging_and_gray_images_work():
    images = torch.rand(2, 1, 6, 6)
    m = torch.zeros(2, 6, 6)
    m[:, 0, 0], m[:, 5, 5] = 1.0, -1.0
    fig = viz.figure(images, {"signed": m}, labels=False, overlay=False, norm="minmax")
    lut = viz.colormap("bwr")
    t = tile(fig, 1, 1, 6, 6)
    assert t[0, 0].tolist() == lut[255].tolist() and t[5, 5].tolist() == lut[0].tolist()
    assert t[2, 2].tolist() == [255, 255, 255]
    g = tile(fig, 0, 0, 6, 6)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])


def test_unit_scale_percentile_is_numpys_on_both_selection_paths():
    """``unit_scale``'s percentile is ``numpy.percentile``'s to the last bit in float64, whether it is
    read from the top values only (high percentiles: a partial selection) or from a whole sort (the
    others): sizes from 1 to a thumbnail's 96 x 96, ties; a row with NaN beside a clean one (NaN sorted
    last, as the top values put it first) leaves the clean row's scaling as it is."""
    from salience._core.tensors import unit_scale

    g = torch.Generator().manual_seed(3)
    rows = [torch.rand(4, n, generator=g, dtype=torch.float64) ** 3 for n in (1, 2, 3, 7, 100, 96 * 96)]
    rows.append(torch.randint(0, 4, (3, 500), generator=g).double())  # ties everywhere
    for m in rows:
        for q in (1.0, 25.0, 50.0, 74.9, 75.0, 76.0, 90.0, 99.0, 99.9, 100.0):
            a = m.numpy()
            lo, top = a.min(1, keepdims=True), a.max(1, keepdims=True)
            hi = np.percentile(a, q, axis=1, keepdims=True)
            hi = np.where(hi > lo, hi, top)
            span = hi - lo
            want = (np.minimum(a, hi) - lo) / np.where(span > 0, span, 1.0)
            assert np.array_equal(unit_scale(m, q).numpy(), want), (m.shape, q)
    m = torch.rand(2, 400, generator=g, dtype=torch.float64)
    m[1, 7] = float("nan")
    for q in (50.0, 99.0):
        got = unit_scale(m, q).numpy()
        s = m.sort(dim=1).values.numpy()  # the order statistics as a whole sort gives them, NaN last
        rank = 399 * q / 100
        b = int(rank)
        t = rank - b
        hi = s[:, b] + (s[:, b + 1] - s[:, b]) * t if t < 0.5 else s[:, b + 1] - (s[:, b + 1] - s[:, b]) * (1 - t)
        assert np.array_equal(got[0], (np.minimum(m[0].numpy(), hi[0]) - s[0, 0]) / (hi[0] - s[0, 0]))
        assert np.isnan(got[1]).all()  # its minimum is NaN: the row is NaN, whichever the order statistics
