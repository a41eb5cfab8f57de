"""The command line says the methods' refusals in its own flags: ``--blur-sigma`` without ``--baseline blur`` was
refused in Python's words (``pass baseline='blur', or leave blur_sigma out``), which a command-line user cannot type.
The Python API keeps its keyword words."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import salience
from salience import SalienceError
from salience.cli import main
from conftest import seeded_small_cnn


@pytest.fixture(scope="module")
def pic(tmp_path_factory):
    p = tmp_path_factory.mktemp("pic") / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(p)
    return p


def test_blur_sigma_without_the_blur_baseline_is_said_in_flags(tmp_path, pic, capsys):
    rc = main(["explain", str(pic), "-m", "demo:shapes", "-o", str(tmp_path / "o"), "--method",
               "integrated_gradients", "--blur-sigma", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "give --baseline blur, or leave --blur-sigma out" in err and "baseline='blur'" not in err, err
    assert not (tmp_path / "o").exists()


def test_the_python_api_keeps_its_keyword_words():
    with pytest.raises(SalienceError, match=r"pass baseline='blur', or leave blur_sigma out"):
        salience.integrated_gradients(seeded_small_cnn().eval(), torch.rand(1, 3, 8, 8), 0, blur_sigma=2.0, steps=2)
