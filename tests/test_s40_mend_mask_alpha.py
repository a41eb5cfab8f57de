"""A mask file is read by its alpha only where the alpha itself makes a mask (some alpha below half its largest);
else by its brightest channel. One pixel of alpha 254 in a white-on-black RGBA mask read the whole image as the
object (the rule was "any alpha below opaque")."""
import numpy as np
import torch
from PIL import Image

from salience.evidence.evaluate import _mask_check
from salience.loading.images import mask_values


def _save(tmp_path, rgba, name="m.png"):
    path = tmp_path / name
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_one_near_opaque_pixel_keeps_the_brightness_rule(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2:5, 2:5, :3] = 255  # white object on black
    rgba[0, 0, 3] = 254
    got = mask_values(_save(tmp_path, rgba))
    assert torch.equal(got[0] >= 0.5, torch.from_numpy(rgba[..., 0] == 255))


def test_an_alpha_mask_is_still_read_by_its_alpha(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: the colour says nothing
    rgba[1:4, 1:6, 3] = 102  # a 40 % opaque overlay on a transparent layer
    got = mask_values(_save(tmp_path, rgba))
    assert torch.equal(got[0] >= got.max() / 2, torch.from_numpy(rgba[..., 3] == 102))


def test_the_mask_check_says_half_its_largest_alpha():
    text = _mask_check([0], ["m/a.png"])
    assert "half its largest alpha" in text and "opaque" not in text
