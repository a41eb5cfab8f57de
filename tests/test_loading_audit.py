"""The Python API of loading (``salience.load_model`` and ``salience.loading.__all__``) over the inputs a
user passes: each call works, or raises a ``SalienceError`` saying what was expected and what to do. Each
test here failed before its fix (a raw ``TypeError`` / ``AttributeError`` / ``RuntimeError``, a message
that sent the user the wrong way, or a silently wrong result). Every file is made here, in ``tmp_path``."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salience import SalienceError
from salience._core.info import ModelInfo
from salience.loading import (load_image, load_images, load_model, load_state, name_classes, normalize_input,
                              preprocess, preprocessing_record, read_labels, read_state_dict, resize_crop,
                              resize_mode, resolve_device, unnormalize, with_preprocessing)

from conftest import SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

INFO = ModelInfo(name="m", input_size=(8, 8), resize=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
X = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))


def _said(pattern: str, fn, *args) -> str:
    """The message of the SalienceError that ``fn(*args)`` raises, which must match ``pattern``."""
    with pytest.raises(SalienceError, match=pattern) as e:
        fn(*args)
    return str(e.value)


@pytest.fixture()
def png(tmp_path) -> Path:
    p = tmp_path / "i.png"
    Image.fromarray((np.random.default_rng(0).random((10, 12, 3)) * 255).astype("uint8")).save(p)
    return p


@pytest.fixture()
def small_sd(tmp_path) -> Path:
    p = tmp_path / "small.pt"
    torch.save(SmallCNN().state_dict(), p)
    return p


# ----------------------------------------------------------------------------- paths and specs of the wrong type

@pytest.mark.parametrize("call, message", [
    (lambda: load_model(3), r"expected a model spec .*got 3"),
    (lambda: load_model(None), r"expected a model spec .*got None"),
    (lambda: load_model("torchvision:resnet18", weights=b"w.pt"), r"weights .*must be a file path.*got bytes"),
    (lambda: load_model("torchvision:resnet18", weights=5), r"weights .*must be a file path.*got a int"),
    (lambda: read_state_dict(None), r"the weights file must be a file path .*NoneType"),
    (lambda: read_labels(["a", "b"]), r"the labels file must be a file path .*list"),
    (lambda: read_labels(None), r"the labels file must be a file path"),
    (lambda: load_image(None), r"load_image's path must be a file path"),
    (lambda: load_image(np.zeros((4, 4, 3))), r"takes its path, got a ndarray.*preprocess"),
    (lambda: load_image(torch.zeros(3, 4, 4)), r"takes its path, got a Tensor"),
    (lambda: load_image(b"\x89PNG\r\n"), r"its bytes go as data="),
], ids=["spec-int", "spec-none", "weights-bytes", "weights-int", "state-none", "labels-list", "labels-none",
        "image-none", "image-ndarray", "image-tensor", "image-bytes"])
def test_a_path_of_the_wrong_type_is_one_line(call, message):
    """A spec, weights file, labels file or image path that is no ``str`` / ``PathLike`` was Python's raw
    ``TypeError: expected str, bytes or os.PathLike object``."""
    with pytest.raises(SalienceError, match=message):
        call()


def test_a_missing_model_file_says_so_and_tilde_is_home(tmp_path, monkeypatch):
    """``load_model("models/m.pt")`` for a missing file said ``unknown model`` (and offered ``demo:shapes``);
    ``~/m.pt`` was never found, for models and for weights."""
    with pytest.raises(SalienceError, match=r"model file .*missing\.pt: no such file; check the path"):
        load_model(str(tmp_path / "missing.pt"))
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.jit.save(torch.jit.script(SmallCNN().eval()), tmp_path / "m.pt")
    assert isinstance(load_model("~/m.pt"), torch.jit.ScriptModule)
    torch.save(SmallCNN().state_dict(), tmp_path / "w.pt")
    assert set(read_state_dict("~/w.pt")) == set(SmallCNN().state_dict())


@pytest.mark.parametrize("spec, expected", [("hf:", "hf:DIR_OR_ID"), ("timm:", "timm:NAME"),
                                            ("torchvision: ", "torchvision:ARCH"), ("demo:", "demo:NAME")])
def test_a_prefix_without_a_name_is_refused(spec, expected, tmp_path, monkeypatch):
    """``hf:`` read the current folder as a transformers model (``Path("").is_dir()``); ``timm:`` offered
    ``aimv2_1b_patch14_224``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SalienceError, match=rf"names no model: expected {expected}") as e:
        load_model(spec)
    assert "did you mean" not in str(e.value)


def test_meta_device_is_refused():
    """``device="meta"`` gave a model without weights, which failed later with torch's raw errors."""
    with pytest.raises(SalienceError, match="meta device holds no weights"):
        resolve_device("meta")
    with pytest.raises(SalienceError, match="meta device"):
        load_model("demo:shapes", device="meta")


# ----------------------------------------------------------------------------- weights files

def test_weights_spelt_like_random_say_so(tmp_path):
    """``weights="RANDOM"`` said only that there is no such file."""
    with pytest.raises(SalienceError, match=r'no such file.*weights="random" \(lower case\)'):
        load_model("torchvision:resnet18", weights="RANDOM")
    with pytest.raises(SalienceError, match=r"is a directory; expected a state-dict file"):
        read_state_dict(tmp_path)


def test_a_foreign_file_as_weights_is_not_sent_to_trust_pickle(tmp_path):
    """An ONNX file (or any file that is no pickle) given as weights said it "contains pickled Python objects"
    and to pass ``trust_pickle=True``, which would not have helped (nor been safe)."""
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0:\x9c\x01\n\x1b")
    assert "trust_pickle" not in _said(r"not a PyTorch weights file \(torch.save writes a zip archive", read_state_dict, p)
    empty = tmp_path / "e.pt"
    empty.write_bytes(b"")
    with pytest.raises(SalienceError, match=r"e\.pt: the file is empty"):
        load_model("torchvision:resnet18", weights=empty)


def test_a_whole_model_file_as_weights_says_load_it_by_itself(tmp_path):
    """A TorchScript archive as weights said torch's "Cannot use weights_only=True with TorchScript archives"
    and then "expected TorchScript"; a .pt2 "failed locating file data.pkl"."""
    ts = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(SmallCNN().eval()), ts)
    with pytest.raises(SalienceError, match=r"a TorchScript archive .* is a whole model.*load_model\("):
        load_model("torchvision:resnet18", weights=ts)
    pt2 = tmp_path / "m.pt2"
    pt2.write_bytes(b"PK\x03\x04")
    with pytest.raises(SalienceError, match=r"a torch.export program \(torch.export.save\) is a whole model"):
        read_state_dict(pt2)


def test_torchvision_weights_of_another_architecture_are_one_short_line(small_sd):
    """torchvision's mismatch was torch's message, every missing key listed (over 2,000 characters)."""
    with pytest.raises(SalienceError) as e:
        load_model("torchvision:resnet18", weights=small_sd)
    text = str(e.value)
    assert "Missing key(s)" not in text and len(text) < 400 and "\n" not in text
    assert "missing conv1.weight, bn1.weight, bn1.bias (+" in text and "unexpected features.0.weight" in text


@pytest.mark.parametrize("state, message", [
    (None, r"expected a state dict .*got NoneType"),
    ([1, 2], r"expected a state dict .*got list"),
    (Path("w.pt"), r"got PosixPath; read the file first: read_state_dict\(path\)"),
    ({"head.weight": 3}, r"'head.weight' holds a int"),
    ({"head.weight": np.zeros((4, 8))}, r"holds a ndarray \(a numpy array: torch.from_numpy\(a\)\)"),
], ids=["none", "list", "path", "int", "numpy"])
def test_load_state_refuses_what_is_no_state_dict(state, message):
    """``load_state`` raised ``TypeError: argument of type 'NoneType' is not iterable``, ``AttributeError: 'int'
    object has no attribute 'shape'``, or torch's ``Error(s) in loading state_dict`` for numpy arrays."""
    with pytest.raises(SalienceError, match=message):
        load_state(SmallCNN(), state, "w.pt", "the model")
    with pytest.raises(SalienceError, match="load_state needs a torch.nn.Module"):
        load_state(None, SmallCNN().state_dict(), "w.pt", "the model")


# ----------------------------------------------------------------------------- class names

@pytest.mark.parametrize("args, message", [
    ((INFO, 3, "abc"), r"labels must be a list of class names.*split into its letters"),
    ((INFO, 3, {"a": 0, "b": 1, "c": 2}), r"labels must be a list .*got dict"),
    ((INFO, 2, ("a", None)), r"labels must be a list of class names \(str\)"),
    ((INFO, 3, 5), r"labels must be a list .*got int"),
    ((INFO, 0, None), r"num_outputs must be .* int >= 1, got 0"),
    ((INFO, "3", None), r"num_outputs must be .*got '3'"),
    ((None, 3, None), r"name_classes needs the model's ModelInfo"),
], ids=["str", "dict", "none-name", "int", "zero", "str-count", "no-info"])
def test_name_classes_refuses_what_are_no_names(args, message):
    """A str of labels became one class per letter and a dict its keys, silently; ``None`` in a list became
    the class ``'None'``; a bad count or info was accepted or a raw ``TypeError`` / ``AttributeError``."""
    with pytest.raises(SalienceError, match=message):
        name_classes(*args)


@pytest.mark.parametrize("text, message", [
    ('{"0": {"name": "cat"}, "1": "dog"}', r'each class name must be a string, got \{"name": "cat"\}'),
    ('{"0": null, "1": "dog"}', r"each class name must be a string, got null"),
    ('["cat", true]', r"expected a JSON list of names"),
])
def test_read_labels_refuses_json_values_that_are_no_names(tmp_path, text, message):
    """A JSON object's values were taken as names whatever they were: ``"{'name': 'cat'}"``, ``'None'``,
    ``'True'``."""
    p = tmp_path / "labels.json"
    p.write_text(text)
    with pytest.raises(SalienceError, match=message):
        read_labels(p)


# ----------------------------------------------------------------------------- image files

@pytest.mark.parametrize("max_pixels", [float("nan"), "100", 0, -1, 1.5, True])
def test_max_pixels_is_checked(png, max_pixels):
    """``max_pixels=nan`` was no limit, silently; ``"100"`` a raw ``TypeError``; ``-1`` "over the limit of
    -1e-06 megapixels"."""
    with pytest.raises(SalienceError, match=r"max_pixels must be an int >= 1 .*or None"):
        load_image(png, max_pixels=max_pixels)
    with pytest.raises(SalienceError, match=r"max_pixels must be"):
        load_images([png], INFO, max_pixels=max_pixels)


def test_max_pixels_in_scientific_notation_is_a_limit(png):
    """``max_pixels=5e7`` (a whole float, as one writes fifty million), a limit before the audit, was refused: "must
    be an int >= 1"."""
    assert torch.equal(load_image(png, max_pixels=5e7), load_image(png))
    with pytest.raises(SalienceError, match=r"over the limit of 0\.0001 megapixels \(100 pixels\)"):
        load_image(png, max_pixels=1e2)
    assert load_images([png], INFO, max_pixels=1e2)[1] == []


def test_load_image_data_must_be_bytes(png):
    import io

    with pytest.raises(SalienceError, match=r"data must be the file's bytes, got BytesIO"):
        load_image("x.png", data=io.BytesIO(png.read_bytes()))
    assert torch.equal(load_image("x.png", data=bytearray(png.read_bytes())), load_image(png))


def test_load_images_refuses_one_path_and_what_are_no_paths(png):
    """One path as ``paths`` was read letter by letter (``('/', 'is a directory')``, ``('t', 'no such file')``
    ...); a ``Path`` or a tensor in the list was a raw ``TypeError``; ``info=None`` a raw ``AttributeError``."""
    for paths in (str(png), png):
        with pytest.raises(SalienceError, match=r"takes a list of image paths, got one path .*pass \[path\]"):
            load_images(paths, INFO)
    with pytest.raises(SalienceError, match=r"got a Tensor among them"):
        load_images([png, torch.zeros(3, 4, 4)], INFO)
    with pytest.raises(SalienceError, match=r"load_images needs a ModelInfo"):
        load_images([png], None)
    batch, ok, errors = load_images(iter([png]), INFO)  # any iterable of paths
    assert batch.shape == (1, 3, 8, 8) and ok == [str(png)] and not errors


# ----------------------------------------------------------------------------- image tensors

@pytest.mark.parametrize("fn", [resize_crop, normalize_input, unnormalize, preprocess])
@pytest.mark.parametrize("x, message", [
    ((X * 255).to(torch.uint8), r"floating-point image in \[0, 1\], got torch.uint8: x.float\(\) / 255"),
    (X.numpy(), r"takes an image tensor .*got ndarray \(a numpy array: torch.from_numpy\(a\)\)"),
    (None, r"takes an image tensor .*got NoneType"),
    (X[0], r"takes an image tensor \(C, H, W\) or \(B, C, H, W\), got shape \(10, 12\)"),
    (X[:, :0], r"the image has no pixels"),
    (X.permute(1, 2, 0), r"has 10 channels .*an \(H, W, C\) image is x.permute\(2, 0, 1\)"),
], ids=["uint8", "numpy", "none", "2d", "empty", "hwc"])
def test_image_functions_refuse_what_is_no_float_image(fn, x, message):
    """A uint8 image was resized then clamped to [0, 1] (every pixel above 0 became 1), silently; numpy, None,
    2-D or empty inputs were torch's or Python's raw errors, an (H, W, C) image mis-resized."""
    with pytest.raises(SalienceError, match=message):
        fn(x, INFO)


@pytest.mark.parametrize("fn", [normalize_input, unnormalize, preprocess])
def test_an_rgba_tensor_is_refused_where_the_channels_count(fn):
    """Four channels for three means were torch's raw "The size of tensor a (4) must match ..."."""
    with pytest.raises(SalienceError, match=r"has 4 channels .*an RGBA image's RGB is x\[\.\.\., :3, :, :\]"):
        fn(torch.rand(4, 10, 12), INFO)


@pytest.mark.parametrize("c", [2, 4, 6])
def test_resize_crop_takes_any_channels_but_an_hwc_image(c):
    """``resize_crop`` (a resize and a crop, channel by channel) refused an RGBA or gray+alpha image, or a mask
    stack, which it resized before the audit; each channel is resized on its own, as alone."""
    x = torch.rand(c, 10, 12, generator=torch.Generator().manual_seed(c))
    got = resize_crop(x, INFO)
    assert got.shape == (c, 8, 8)
    assert torch.equal(got, torch.cat([resize_crop(x[i:i + 1], INFO) for i in range(c)]))
    with pytest.raises(SalienceError, match=r"an \(H, W, C\) image is x.permute\(2, 0, 1\)"):
        resize_crop(torch.rand(10, 12, 4), INFO)


@pytest.mark.parametrize("dtype, advice", [(torch.int64, "x.float() / 255 for 8-bit values, x.float() / 65535"),
                                           (torch.int16, "x.float() / 255 for 8-bit"), (torch.bool, "x.float()")])
def test_an_integer_image_is_told_its_scale(dtype, advice):
    """An int64 image (``torch.from_numpy`` of a 0..255 array) was told ``x.float()``, which gave 0..255 floats:
    clamped to white by ``resize_crop``."""
    with pytest.raises(SalienceError, match=r"got torch\.\w+: " + re.escape(advice)):
        resize_crop((X * 255).to(dtype), INFO)


@pytest.mark.parametrize("fn", [resize_crop, normalize_input, unnormalize, preprocess, resize_mode,
                                preprocessing_record])
@pytest.mark.parametrize("info, message", [
    (ModelInfo(input_size=(0, 0)), r"input_size must be \(H, W\), two ints >= 1"),
    (ModelInfo(input_size=(8.5, 8)), r"input_size must be \(H, W\)"),
    (ModelInfo(input_size=(8, 8), resize=0), r"resize must be an int >= 1"),
    (ModelInfo(std=(0.0, 1.0, 1.0)), r"std must be finite numbers > 0"),
    (ModelInfo(mean=(float("nan"),)), r"mean must be finite numbers"),
    (None, r"needs a ModelInfo"),
    ({"input_size": (8, 8)}, r"needs a ModelInfo .*got dict"),
], ids=["size0", "size-float", "resize0", "std0", "mean-nan", "none", "dict"])
def test_a_model_info_that_cannot_be_applied_is_refused(fn, info, message):
    """A ModelInfo with a zero size was torch's raw "Input and output sizes should be greater than 0"; a zero std
    made every pixel inf, silently; a dict or None a raw ``AttributeError``."""
    with pytest.raises(SalienceError, match=message):
        fn(X, info) if fn not in (resize_mode, preprocessing_record) else fn(info)


@pytest.mark.parametrize("fn", [normalize_input, unnormalize, preprocess])
def test_mean_of_another_length_than_the_channels_is_refused(fn):
    """Two means for three channels: torch's raw "The size of tensor a (3) must match the size of tensor b (2)"."""
    with pytest.raises(SalienceError, match=r"mean has 2 values for an image of 3 channels"):
        fn(X, ModelInfo(mean=(0.5, 0.5)))


def test_half_precision_images_are_resized_on_the_cpu():
    """A float16 image on the CPU was torch's raw ``"compute_index_ranges_weights" not implemented for 'Half'``."""
    big = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(1)).half()
    out = resize_crop(big, INFO)
    assert out.dtype == torch.float16 and out.shape == (3, 8, 8)
    assert torch.equal(out, resize_crop(big.float(), INFO).half())


# ----------------------------------------------------------------------------- with_preprocessing

def test_with_preprocessing_takes_numbers_and_refuses_the_rest():
    """``mean=0.5`` (one value, as the docstring says) was ``TypeError: 'float' object is not iterable``, a numpy
    int size ``'numpy.int64' object is not iterable``; ``mean="abc"`` a raw ``ValueError``, ``info=None`` a raw
    ``AttributeError``."""
    got = with_preprocessing(INFO, size=np.int64(6), mean=0.5, std=torch.tensor([0.1, 0.2, 0.3]))
    assert got.input_size == (6, 6) and got.mean == (0.5, 0.5, 0.5)
    assert got.std == pytest.approx((0.1, 0.2, 0.3)) and all(isinstance(v, float) for v in got.std)
    assert with_preprocessing(INFO, channels=np.int64(1)).channels == 1
    for kwargs, message in (({"mean": "abc"}, r"mean must be a number or one number per channel, got 'abc'"),
                            ({"std": [None] * 3}, r"std must be a number or one number per channel"),
                            ({"size": 8.5}, r"size must be a positive int \(pixels\), got 8.5"),
                            ({"size": torch.tensor(8.5)}, r"size must be a positive int")):
        with pytest.raises(SalienceError, match=message):
            with_preprocessing(INFO, **kwargs)
    with pytest.raises(SalienceError, match=r"with_preprocessing needs a ModelInfo"):
        with_preprocessing(None, size=8)
    assert not math.isnan(got.mean[0])


# ----------------------------------------------------------------------------- Keras files

@pytest.mark.filterwarnings("ignore:You are saving a model that has not yet been built:UserWarning")
def test_keras_files_that_cannot_be_models_name_the_file(tmp_path):
    """A .keras file that is no zip archive was Keras's "File not found: filepath=..." of a file that is there; an
    unbuilt model's refusal did not name the file it came from."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras differently
        pytest.skip("keras runs on another backend in this process")
    bad = tmp_path / "cut.keras"
    bad.write_bytes(b"PK\x03\x04 cut short")
    assert "File not found" not in _said(r"cut\.keras: Keras could not load this model: not a \.keras file", load_model, bad)
    unbuilt = tmp_path / "unbuilt.keras"
    keras.Sequential([keras.layers.Dense(2)]).save(unbuilt)
    with pytest.raises(SalienceError, match=r"unbuilt\.keras: the Keras model has no known input shape"):
        load_model(unbuilt)


def test_an_hf_folder_with_cut_weights_is_one_line(tmp_path):
    """A ``save_pretrained`` folder whose ``model.safetensors`` was cut short was safetensors' raw
    ``SafetensorError: Error while deserializing header``."""
    from transformers import ViTConfig

    ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=8, num_labels=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"xx")
    _said(r"hf:.*: transformers could not load an image classifier from this folder \(.*header", load_model,
          f"hf:{tmp_path}")


def test_numpy_strings_are_paths(png):
    """A path from a numpy array of paths (``np.str_``, a str) is read as a path, not refused as an array."""
    assert torch.equal(load_image(np.array([str(png)])[0]), load_image(png))


# ----------------------------------------------------------------------------- review: ~, TIFF samples, channels

def test_a_folder_called_tilde_in_the_working_directory_is_still_read(tmp_path, monkeypatch, png):
    """``~/w.pt`` names the home folder's file; where that is missing and the working directory holds a folder
    literally called ``~`` (as ``load_model`` already allowed), its file was refused as "no such file" (and read
    before ``~`` was expanded)."""
    home, work = tmp_path / "home", tmp_path / "work"
    (work / "~").mkdir(parents=True)
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    torch.save(SmallCNN().state_dict(), work / "~" / "w.pt")
    (work / "~" / "i.png").write_bytes(png.read_bytes())
    assert set(read_state_dict("~/w.pt")) == set(SmallCNN().state_dict())
    assert torch.equal(load_image("~/i.png"), load_image(png))
    torch.save({"x": torch.ones(1)}, home / "w.pt")  # the home folder's file first, as the shell would
    assert set(read_state_dict("~/w.pt")) == {"x"}


def test_tilde_is_home_in_hf_and_python_specs(tmp_path, monkeypatch):
    """``hf:~/dir`` and ``python:~/f.py:build`` did not expand ``~`` where plain paths do: "no such file"."""
    from transformers import ViTConfig, ViTForImageClassification

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=8, num_labels=2)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    assert load_model("hf:~/vit").config.num_labels == 2
    (tmp_path / "f.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 3)\n")
    assert isinstance(load_model("python:~/f.py:build"), torch.nn.Linear)


def _tiff(tmp_path, name: str, a: np.ndarray) -> Path:
    p = tmp_path / name
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(p, a)
    return p


RAMP = np.linspace(0.0, 1.0, 20, dtype=np.float32).reshape(4, 5)


def test_a_float_tiff_in_0_1_is_read_as_it_is(tmp_path):
    """A float TIFF (PIL's mode ``F``) was divided by 255: an image in [0, 1], as torchvision and scikit-image take
    a float image, came out nearly black (its white 0.0039)."""
    p = tmp_path / "f.tif"
    Image.fromarray(RAMP, mode="F").save(p)
    got = load_image(p)
    assert got.shape == (3, 4, 5) and torch.equal(got[0], torch.from_numpy(RAMP)) and torch.equal(got[0], got[2])
    skimage_io = pytest.importorskip("skimage.io")
    assert np.array_equal(got[0].numpy(), skimage_io.imread(p))  # scikit-image reads the samples as they are


@pytest.mark.parametrize("a, message", [
    (RAMP * 255, r"f\.tif: floating-point samples from 0 to 255: .* \[0, 1\]; .*divide by 255"),
    (np.where(RAMP > 0.5, np.nan, RAMP).astype(np.float32), r"NaN or infinite samples"),
], ids=["0-255", "nan"])
def test_a_float_tiff_outside_0_1_is_refused(tmp_path, a, message):
    """A float TIFF of 0..255 happened to be right (divided by 255), one of 0..4095 (or kelvins) white, NaN black:
    its range is the file's own, so it is refused and the message says how to make it [0, 1]."""
    p = tmp_path / "f.tif"
    Image.fromarray(a, mode="F").save(p)
    with pytest.raises(SalienceError, match=message):
        load_image(p)


def test_integer_tiffs_are_scaled_by_their_samples_range(tmp_path):
    """A 32-bit TIFF beyond 16 bits was clipped at 65535 (white) and a signed 16-bit one divided by 65535 (half as
    bright as scikit-image and torchvision read an ``int16`` image: / 32767); negative samples were black."""
    wide = _tiff(tmp_path, "i32.tif", (RAMP * 1e6).astype(np.int32))
    with pytest.raises(SalienceError, match=r"i32\.tif: integer samples from 0 to 1000000: .*65535 \(white\)"):
        load_image(wide)
    sixteen = (RAMP * 65535).astype(np.int32)  # 16-bit data in a 32-bit file: as the 16-bit file
    assert torch.equal(load_image(_tiff(tmp_path, "i32small.tif", sixteen))[0],
                       torch.from_numpy((sixteen / 65535.0).astype(np.float32)))
    signed = (RAMP * 32767).astype(np.int16)
    got = load_image(_tiff(tmp_path, "i16.tif", signed))[0]
    assert torch.equal(got, torch.from_numpy((signed / 32767.0).astype(np.float32)))
    skimage_util = pytest.importorskip("skimage.util")
    assert np.allclose(got.numpy(), skimage_util.img_as_float(signed), atol=1e-7)
    with pytest.raises(SalienceError, match=r"signed 16-bit samples from -5 to .*negative"):
        load_image(_tiff(tmp_path, "neg.tif", signed - 5))
    unsigned = (RAMP * 65535).astype(np.uint16)
    assert torch.equal(load_image(_tiff(tmp_path, "u16.tif", unsigned))[0],
                       torch.from_numpy((unsigned / 65535.0).astype(np.float32)))


def test_a_tiff_pil_cannot_decode_says_so(tmp_path):
    """A float16 TIFF (or 64-bit float, float RGB) said "not an image file ... check that it is not empty or
    truncated", of a whole, valid TIFF."""
    p = _tiff(tmp_path, "h.tif", RAMP.astype(np.float16))
    for call in (lambda: load_image(p), lambda: load_image("h.tif", data=p.read_bytes())):
        with pytest.raises(SalienceError, match=r"h\.tif: a TIFF file whose samples PIL cannot decode .*16- or 64-bit"):
            call()


def test_weights_without_batchnorm_counts_load(tmp_path):
    """A state dict without BatchNorm's ``num_batches_tracked`` (saved before PyTorch 0.4.1, as torchvision's first
    ResNet files; or converted from another library), which ``torch`` loads, was refused since the audit:
    "missing bn1.num_batches_tracked, ..."; for ``load_state`` even with the state dict's own metadata."""
    import torchvision

    source = torchvision.models.resnet18(num_classes=10)
    plain = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "r18.pth")
    got = load_model("torchvision:resnet18", weights=tmp_path / "r18.pth")  # fine-tuned to 10 classes, too
    assert torch.equal(got.fc.weight, source.fc.weight) and torch.equal(got.layer4[1].bn2.running_var,
                                                                         source.layer4[1].bn2.running_var)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net[1].num_batches_tracked.fill_(7)
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    del state["1.num_batches_tracked"]  # an OrderedDict with its metadata: torch's strict load refuses it
    load_state(net, state, "w.pt", "the net")
    assert torch.equal(net[0].weight, state["0.weight"]) and int(net[1].num_batches_tracked) == 7
    with pytest.raises(SalienceError, match=r"missing 1\.running_mean"):
        load_state(net, {k: v for k, v in state.items() if k != "1.running_mean"}, "w.pt", "the net")


def test_a_model_info_of_numpy_or_torch_values_is_applied():
    """A ModelInfo built with numpy / torch values (``mean=np.array(...)``, ``std=torch.tensor(...)``, sides from
    an array, ``resize=224 / 0.875`` = 256.0), which preprocessing applied before the audit, was refused: "the
    ModelInfo's mean must be finite numbers ... got array([...])"."""
    plain = INFO
    odd = ModelInfo(name="m", input_size=np.array([8, 8]), resize=10.0, mean=np.array(INFO.mean),
                    std=torch.tensor(INFO.std, dtype=torch.float64))
    for fn in (resize_crop, normalize_input, unnormalize, preprocess):
        assert torch.equal(fn(X, odd), fn(X, plain)), fn.__name__
    assert preprocessing_record(odd) == preprocessing_record(plain)
    got = with_preprocessing(odd, std=0.5)
    assert got.input_size == (8, 8) and got.resize == 10 and got.mean == INFO.mean and got.std == (0.5,) * 3
    with pytest.raises(SalienceError, match=r"input_size must be \(H, W\)"):
        resize_crop(X, ModelInfo(input_size=np.zeros((2, 2), dtype=int) + 8))


def test_name_classes_takes_an_array_of_names_and_numbers_as_read_labels_does(tmp_path):
    """An array of names (``np.loadtxt(..., dtype=str)``, a pandas column's ``.values``), which named the classes
    before the audit, was refused ("got ndarray"); so were numbers, which ``read_labels`` takes from a JSON list,
    and a 0-d tensor as ``num_outputs``."""
    names = np.array(["cat", "dog", "bird"])
    assert name_classes(INFO, 3, names) == (dataclasses.replace(INFO, class_names=("cat", "dog", "bird")), "labels")
    p = tmp_path / "labels.json"
    p.write_text("[3, 5, 7]")
    assert name_classes(INFO, torch.tensor(3), [3, 5, 7])[0].class_names == read_labels(p) == ("3", "5", "7")
    with pytest.raises(SalienceError, match=r"labels must be a list of class names"):
        name_classes(INFO, 2, ["a", True])


def test_a_hub_id_or_an_architecture_without_its_prefix_is_told_it(tmp_path, monkeypatch):
    """``google/vit-base-patch16-224`` (a hub id without ``hf:``) was "model file ...: no such file; check the path"
    since the audit; ``resnet18`` (torchvision's, without ``torchvision:``) got "did you mean 'demo:shapes'"."""
    monkeypatch.chdir(tmp_path)
    text = _said(r"unknown model 'google/vit-base-patch16-224': a hub model id goes with its library, "
                 r"hf:google/vit-base-patch16-224 \(transformers\)", load_model, "google/vit-base-patch16-224")
    assert "check the path" not in text
    _said(r"or timm:resnet50\.a1_in1k", load_model, "timm/resnet50.a1_in1k")
    _said(r"unknown model 'resnet18'; did you mean 'torchvision:resnet18' \(or 'timm:resnet18'\)\?", load_model,
          "resnet18")
    (tmp_path / "models").mkdir()
    _said(r"model file models/m: no such file; check the path", load_model, "models/m")  # a folder that is there


def test_a_safetensors_file_of_another_name_is_read(tmp_path):
    """A safetensors file named ``.bin`` / ``.pt`` (as some exports name it) was "not a PyTorch model file ...;
    expected a state dict", of a state dict."""
    from safetensors.torch import save_file

    state = SmallCNN().state_dict()
    save_file(state, tmp_path / "w.bin")
    got = read_state_dict(tmp_path / "w.bin")
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
