"""``load_images`` checks its ``ModelInfo`` once per call, not once more in ``resize_crop`` and again in
``normalize_input`` for each image (``check_info``: about 20 us a time; 64 small images went from 29.1 to 24.9 ms a
call). The count failed before (1 + 2 per image); the batch is what the public functions give image by image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from salience import SalienceError
from salience._core.info import ModelInfo
from salience.loading import images, load_image, load_images, normalize_input, resize_crop

INFO = ModelInfo(name="m", input_size=(6, 6), resize=7, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture()
def pngs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(9, 11, 3), (12, 8, 3), (10, 10, 3)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray((rng.random(shape) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("info", [INFO, ModelInfo(name="gray", input_size=(5, 5), mean=(0.5,), std=(0.2,), channels=1)])
def test_load_images_checks_its_info_once(pngs, monkeypatch, info):
    calls = []
    real = images.check_info
    monkeypatch.setattr(images, "check_info", lambda i, fn: calls.append(fn) or real(i, fn))
    batch, ok, errors = load_images(pngs, info)
    assert calls == ["load_images"] and errors == [] and len(ok) == 3
    monkeypatch.undo()
    want = torch.stack([normalize_input(resize_crop(load_image(p), info), info) for p in pngs])
    assert torch.equal(batch, want)


def test_stats_that_do_not_fit_the_channels_are_still_refused(pngs):
    with pytest.raises(SalienceError, match=r"load_images: the ModelInfo's mean has 2 values for an image of 3"):
        load_images(pngs, ModelInfo(name="m", mean=(0.5, 0.5)))
