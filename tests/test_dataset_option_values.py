"""``explain_dataset(method_options=...)``: an option's value checked before any file is written, on the
first image the run reads (or a blank image of the model's input size), as ``salience explain DIR``
checks the flags' values (:func:`salience.methods.options.check_bound_values`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from tests.conftest import assert_same_snapshot, model_snapshot


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _png_folder(folder, n: int = 2):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(
            folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("method, options, said", [
    ("smoothgrad", {"samples": 0}, "samples must be an int >= 1"),
    ("occlusion", {"window": 10 ** 6}, "larger than the 64x64 image"),
    ("gradcam", {"layer": "nope"}, "no layer named 'nope'"),
])
def test_a_bad_value_is_refused_before_the_run_folder_is_made(tmp_path, method, options, said):
    """Each of these made every image an error row in a run folder (the method's error per image)."""
    images = _png_folder(tmp_path / "imgs")
    model = salience.load_model("demo:shapes")
    before = model_snapshot(model)
    with pytest.raises(SalienceError, match=rf"^method_options\['{method}'\]: .*{said}"):
        salience.explain_dataset(model, images, [method], tmp_path / "run", method_options={method: options},
                                 workers=0, model_spec="demo:shapes")
    assert not (tmp_path / "run").exists()
    assert_same_snapshot(before, model_snapshot(model))


def test_checked_on_the_first_image_of_a_users_dataset(tmp_path):
    """A model without an input size run on a dataset of 8 x 8 tensors: a 10-pixel window is refused on
    its first item (a window the model's size would not say anything of), a 4-pixel one runs."""
    model = _tiny()
    data = torch.utils.data.TensorDataset(torch.rand(3, 3, 8, 8))
    before = model_snapshot(model)
    with pytest.raises(SalienceError, match=r"^method_options\['occlusion'\]: window 10x10 is larger than the 8x8"):
        salience.explain_dataset(model, data, ["occlusion"], tmp_path / "run", workers=0,
                                 method_options={"occlusion": {"window": 10, "stride": 2}})
    assert not (tmp_path / "run").exists()
    assert_same_snapshot(before, model_snapshot(model))
    run = salience.explain_dataset(model, data, ["occlusion"], tmp_path / "ok", workers=0,
                                   method_options={"occlusion": {"window": 4, "stride": 2}})
    assert run.table.column("error").to_pylist() == [None] * 3


def test_an_unreadable_first_image_is_checked_on_a_blank_one(tmp_path):
    """The first image does not decode: the values are checked on a blank image of the model's input
    size, still before the run folder is made."""
    images = _png_folder(tmp_path / "imgs")
    (images / "0.png").write_bytes(b"not an image")
    with pytest.raises(SalienceError, match=r"^method_options\['smoothgrad'\]: samples"):
        salience.explain_dataset("demo:shapes", images, ["smoothgrad"], tmp_path / "run", workers=0,
                                 method_options={"smoothgrad": {"samples": 0}})
    assert not (tmp_path / "run").exists()
