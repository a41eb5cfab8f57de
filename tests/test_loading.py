"""salience.io: image files in every mode, bad files, size limits, preprocessing, load_model."""
from __future__ import annotations


import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import SalienceError
from salience._core.info import ModelInfo
from salience.loading import load_image, load_images, load_model, normalize_input, preprocess, resize_crop, unnormalize

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_with_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` but holds next to no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------ reading images


def test_rgb_png_is_exact(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_grayscale_is_repeated_over_three_channels(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png")
    want = torch.from_numpy(g).float() / 255
    for c in range(3):
        assert torch.equal(x[c], want)


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[0, 0] = (10, 20, 30, 255)   # opaque: its own colour
    a[0, 1] = (10, 20, 30, 0)     # transparent: white
    a[0, 2] = (0, 0, 0, 128)      # half black over white: grey
    a[1, :] = (200, 100, 0, 255)
    Image.fromarray(a, mode="RGBA").save(tmp_path / "t.png")
    x = load_image(tmp_path / "t.png")
    assert x.shape == (3, 2, 3)
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert torch.equal(x[:, 0, 1], torch.ones(3))
    assert torch.allclose(x[:, 0, 2], torch.full((3,), 127 / 255), atol=1.5 / 255)
    # Palette image with a transparent index: also on white.
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    y = load_image(tmp_path / "p.png")
    assert torch.equal(y[:, 0, 0], torch.tensor([1.0, 0, 0])) and torch.equal(y[:, 0, 1], torch.ones(3))


def test_16bit_grayscale_keeps_its_precision(tmp_path):
    v = np.array([[0, 1, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    x = load_image(tmp_path / "d.png")
    want = torch.from_numpy(v.astype(np.float64) / 65535).float()
    assert torch.allclose(x[0], want, atol=1e-7) and torch.equal(x[0], x[2])
    assert 0 < x[0, 0, 1] < 1 / 255  # a value 8 bits would have lost


def test_cmyk_is_converted_like_pil(tmp_path):
    a = _rgb(6, 5)
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.tiff")
    x = load_image(tmp_path / "c.tiff")
    want = torch.from_numpy(np.array(cmyk.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert x.shape == (3, 6, 5) and torch.equal(x, want)


def test_exif_orientation_is_applied(tmp_path):
    a = _rgb(4, 6)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "o.jpg")
    assert x.shape == (3, 6, 4)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("this is not an image\n"), "not an image file"),
        (lambda p: p.write_bytes(b""), "not an image file"),
    ],
    ids=["missing", "directory", "text-named-png", "empty"],
)
def test_bad_files_give_one_line(tmp_path, make, words):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(SalienceError) as e:
        load_image(p)
    msg = str(e.value)
    assert words in msg and str(p) in msg and "\n" not in msg


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_reported(tmp_path, fmt):
    p = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(_rgb(64, 64)).save(p, format=fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SalienceError, match="corrupt or truncated"):
        load_image(p)


def test_huge_header_is_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "huge.png"
    _png_with_size(p, 100_000, 100_000)  # 10 gigapixels: 120 GB as float32
    from PIL import ImageFile

    def no_decode(self):  # pragma: no cover - must not be reached
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(SalienceError) as e:
        load_image(p)
    assert "100000x100000" in str(e.value) and "limit of 50 megapixels" in str(e.value)
    assert "--max-pixels" in str(e.value)
    # A normal image over a user-given limit, too; and PIL's own bomb limit is left as it was.
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "small.png")
    with pytest.raises(SalienceError, match=r"100x100 = 10000 pixels is over the limit of 0.005 megapixels \(5000 pixels\)"):
        load_image(tmp_path / "small.png", max_pixels=5000)  # was "0.0 megapixels is over the limit of 0.005"
    assert Image.MAX_IMAGE_PIXELS == 89478485


def test_images_loaded_in_threads_leave_pils_limit_as_it_was(tmp_path, monkeypatch):
    """The explorer loads images in threads: calls that overlap must still put PIL's bomb limit back
    (a save / restore per call left it lifted for good; the full suite caught it)."""
    import threading

    Image.fromarray(_rgb(20, 20)).save(tmp_path / "a.png")
    limit, real_open = Image.MAX_IMAGE_PIXELS, Image.open
    meet = threading.Barrier(4)

    def open_together(*args, **kwargs):  # the four threads are inside the lifted limit at once
        try:
            meet.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_together)
    errors: list = []

    def work():
        try:
            for _ in range(20):
                assert load_image(tmp_path / "a.png").shape == (3, 20, 20)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Image.MAX_IMAGE_PIXELS == limit


def test_images_over_pils_bomb_limit_but_under_ours_are_read(tmp_path, monkeypatch):
    Image.fromarray(_rgb(40, 30)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would raise DecompressionBombError
    x = load_image(tmp_path / "a.png", max_pixels=10_000)
    assert x.shape == (3, 40, 30) and Image.MAX_IMAGE_PIXELS == 100


# ------------------------------------------------------------------------------ preprocessing


def test_resize_crop_matches_torchvision_transforms():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    torch.manual_seed(0)
    img = torch.rand(3, 300, 400)
    info = ModelInfo(input_size=(224, 224), resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ref = tvf.normalize(
        tvf.center_crop(tvf.resize(img, 256, antialias=True), [224, 224]), info.mean, info.std
    )
    got = preprocess(img, info)
    assert got.shape == (3, 224, 224)
    assert torch.allclose(got.clamp(-3, 3), ref.clamp(-3, 3), atol=0.02)
    assert torch.allclose(unnormalize(got, info), resize_crop(img, info), atol=1e-5)


def test_preprocess_plain_resize_gray_and_identity():
    img = torch.rand(3, 10, 20)
    assert torch.equal(preprocess(img, ModelInfo()), img)  # no input size, no stats: unchanged
    out = preprocess(img, ModelInfo(input_size=(5, 7)))
    assert out.shape == (3, 5, 7)
    gray = normalize_input(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2), ModelInfo(channels=1))
    assert gray.shape == (1, 2, 2) and torch.allclose(gray, torch.full((1, 2, 2), 0.299))


def test_load_images_keeps_good_files_and_reports_bad(tmp_path):
    for i in range(2):
        Image.fromarray(_rgb(30, 40, seed=i)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "bad.png").write_text("nope")
    paths = [tmp_path / "ok0.png", tmp_path / "bad.png", tmp_path / "missing.jpg", tmp_path / "ok1.png"]
    info = ModelInfo(input_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch, ok, errors = load_images(paths, info)
    assert batch.shape == (2, 3, 16, 16)
    assert ok == [str(paths[0]), str(paths[3])]
    assert [e[0] for e in errors] == [str(paths[1]), str(paths[2])]
    assert torch.allclose(batch[1], preprocess(load_image(paths[3]), info))
    none, ok2, errs2 = load_images([paths[1]], info)
    assert none is None and ok2 == [] and len(errs2) == 1


# ------------------------------------------------------------------------------ models


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_load_model_torchscript(tmp_path):
    torch.manual_seed(0)
    m = Tiny().train()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(m.eval(), torch.rand(1, 3, 8, 8)), str(path))
    loaded = load_model(path)
    assert not loaded.training and all(not mod.training for mod in loaded.modules())
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(loaded(x), m(x), atol=1e-6)
    assert loaded.salience_info.name == "tiny.pt"


def test_torchscript_model_is_explained_like_the_original(tmp_path):
    torch.manual_seed(0)
    m = Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(m, torch.rand(1, 3, 8, 8)), str(path))
    loaded = load_model(path)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(salience.vanilla(loaded, x), salience.vanilla(m, x), atol=1e-6)


def test_default_methods_of_a_torchscript_model_are_those_that_run_on_it(tmp_path):
    """``default_methods`` (what evaluate, demo and list offer) on a TorchScript file: each of them
    runs and equals the original module's map; each method left out refuses it with a SalienceError.
    A method put on the wrong side fails here either way."""
    from salience.methods import METHODS, default_methods
    from salience.demo import zoo

    m = zoo.load_demo("shapes")
    torch.jit.save(torch.jit.trace(m, torch.rand(1, 3, 64, 64)), str(tmp_path / "m.pt"))
    loaded = load_model(tmp_path / "m.pt")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    chosen = default_methods(loaded)
    assert {"vanilla", "smoothgrad", "integrated_gradients", "occlusion", "rise"} <= set(chosen)
    for name, fn in METHODS.items():
        opts = {"masks": 64} if name == "rise" else {}
        if name in chosen:
            assert torch.allclose(fn(loaded, x, 2, **opts), fn(m, x, 2, **opts), rtol=1e-4, atol=1e-6), name
        else:
            with pytest.raises(SalienceError):
                fn(loaded, x, 2, **opts)


def test_load_model_state_dict_with_torchvision_arch(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    ref = tvm.resnet18(num_classes=7)  # fine-tuned to 7 classes: the head is read from the file
    sd_path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, sd_path)
    m = load_model("torchvision:resnet18", weights=sd_path)
    assert not m.training and m.fc.out_features == 7
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(m(x), ref.eval()(x), atol=1e-5)
    info = m.salience_info
    assert info.input_size == (224, 224) and info.resize == 256 and info.class_names is None
    assert info.mean == pytest.approx((0.485, 0.456, 0.406))
    # the same file alone: it is weights without an architecture
    with pytest.raises(SalienceError, match="state dict.*torchvision:"):
        load_model(sd_path)
    with pytest.raises(SalienceError, match="does not fit"):
        load_model("torchvision:alexnet", weights=sd_path)


def test_torchvision_random_weights_have_imagenet_names():
    pytest.importorskip("torchvision")
    m = load_model("torchvision:resnet18", weights="random")
    names = m.salience_info.class_names
    assert len(names) == 1000 and names[0] == "tench"


def test_torchvision_pretrained_offline_is_one_clear_line(monkeypatch, tmp_path):
    pytest.importorskip("torchvision")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SalienceError) as e:
        load_model("torchvision:resnet18")
    msg = str(e.value)
    assert "pretrained weights for resnet18" in msg and "weights=FILE" in msg and "--" not in msg and "\n" not in msg


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(Tiny(), path)
    with pytest.raises(SalienceError) as e:
        load_model(path)
    assert "trust_pickle=True" in str(e.value) and "--" not in str(e.value) and "arbitrary code" in str(e.value)
    m = load_model(path, trust_pickle=True)
    assert isinstance(m, Tiny) and not m.training


@pytest.mark.parametrize(
    "spec, words",
    [
        ("demo:shape", "did you mean 'shapes'"),
        ("shapes", "did you mean 'demo:shapes'"),
        ("torchvision:resnet19", "did you mean 'resnet18'"),
        ("nothere.pt", "expected demo:NAME"),
    ],
)
def test_unknown_models_suggest_names(spec, words):
    with pytest.raises(SalienceError, match=words):
        load_model(spec)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello")
    with pytest.raises(SalienceError, match="not a PyTorch model file"):
        load_model(p)
    q = tmp_path / "m.onnx"
    q.write_bytes(b"\x08\x01")
    try:
        import onnx2torch  # noqa: F401
    except ImportError:
        with pytest.raises(SalienceError, match="onnx2torch.*TorchScript"):
            load_model(q)
    with pytest.raises(SalienceError, match="go with a torchvision"):
        load_model("demo:shapes", weights=p)


def test_demo_model_is_exported_and_ready():
    m = salience.load_model("demo:shapes")
    assert not m.training and m.salience_info.input_size == (64, 64)
    assert m.salience_info.class_names[:2] == ("circle", "square")


class _Sizes:
    """``F.interpolate`` as it is, with the largest output it was asked for (elements) kept; an output
    over ``cap`` elements raises ``MemoryError`` before anything is allocated (as the allocation would)."""

    def __init__(self, cap: int = 50_000_000):
        self.real, self.cap, self.largest = torch.nn.functional.interpolate, cap, 0

    def __call__(self, x, size=None, *args, **kwargs):
        if size is not None:
            n = int(np.prod(x.shape[:2])) * int(np.prod(size))
            self.largest = max(self.largest, n)
            if n > self.cap:
                raise MemoryError(f"interpolate to {tuple(x.shape[:2])} + {tuple(size)}: {n * 4 / 1e9:.1f} GB")
        return self.real(x, size, *args, **kwargs)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_preprocessing_of_an_extreme_aspect_resizes_only_the_crop(monkeypatch, mode):
    """Resize the shorter side to 256, centre-crop 224: a 1x60000 image was resized to 256 x 15,360,000
    first (47 GB as float32 RGB). Now no output over the crop's size is asked for, and the crop equals
    the same resize computed on a slice of the image around its centre (the scale is 256: a slice
    from an integer column lines up with the whole image's samples)."""
    sizes = _Sizes()
    monkeypatch.setattr(torch.nn.functional, "interpolate", sizes)
    info = ModelInfo(name="x", input_size=(224, 224), resize=256, interpolation=mode)
    wide = torch.rand(3, 1, 60_000, generator=torch.Generator().manual_seed(0))
    got = resize_crop(wide, info)
    assert got.shape == (3, 224, 224)
    assert sizes.largest <= 3 * 256 * 224
    a = 29_990  # the crop's columns are (15,360,000 - 224) / 2 = 7,679,888 on: source columns 29,999.6..30,000.4
    part = sizes.real(wide[None, :, :, a:a + 20], size=(256, 20 * 256), mode=mode, align_corners=False,
                      antialias=True)[0].clamp(0, 1)
    left = 7_679_888 - a * 256
    torch.testing.assert_close(got, part[:, 16:240, left:left + 224], atol=1e-5, rtol=0)
    tall = resize_crop(wide.transpose(1, 2), info)  # 60000x1: the same, transposed
    torch.testing.assert_close(tall, got.transpose(1, 2), atol=1e-5, rtol=0)


def test_the_crop_only_resize_equals_the_whole_resize_on_moderate_aspects(monkeypatch):
    """The crop-only resize (used over ``LARGEST_RESIZE`` pixels) forced on moderate images equals the
    whole resize then crop within float rounding of the resize weights: both interpolations, shorter
    sides resized up or down, a crop larger than the resized side (stretched as before), odd sizes."""
    import salience.loading.images as images

    gen = torch.Generator().manual_seed(1)
    cases = [((h, w), s, t, mode) for h, w in [(50, 400), (400, 50), (37, 301), (256, 300), (3, 900), (1, 700)]
             for s, t in [(256, (224, 224)), (200, (224, 224)), (64, (48, 60)), (300, (224, 160))]
             for mode in ("bilinear", "bicubic")]
    pictures = [torch.rand(3, h, w, generator=gen) for (h, w), *_ in cases]
    infos = [ModelInfo(name="x", input_size=t, resize=s, interpolation=mode) for _, s, t, mode in cases]
    whole = [resize_crop(x, info) for x, info in zip(pictures, infos)]
    monkeypatch.setattr(images, "LARGEST_RESIZE", 0)
    for x, info, expected, case in zip(pictures, infos, whole, cases):
        torch.testing.assert_close(resize_crop(x, info), expected, atol=1e-4, rtol=0, msg=str(case))
        torch.testing.assert_close(resize_crop(x[None], info), expected[None], atol=1e-4, rtol=0, msg=str(case))
