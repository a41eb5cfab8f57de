"""Defects found by a command-line audit: each a bad value or path met as a user would meet it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from salience.cli import main


@pytest.fixture(scope="module")
def pic(tmp_path_factory):
    p = tmp_path_factory.mktemp("pic") / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(p)
    return p


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("options, words", [
    (["--method", "vanilla,scorecam", "--softmax", "nope"], "--softmax: softmax must be one of auto, classes, none, "
                                                            "channels; got 'nope'"),
    (["--method", "vanilla,ablationcam", "--softmax", "channels"], "--softmax: softmax must be one of auto, classes"),
    (["--method", "vanilla,ablationcam", "--value", "nan"], "--value: value must be a finite number"),
    (["--method", "vanilla,occlusion", "--softmax", "nope"], "--softmax: softmax must be one of auto, classes, none"),
    (["--method", "vanilla,rise", "--softmax", "nope"], "--softmax: softmax must be one of auto, classes, none"),
])
def test_values_checked_after_the_first_pass_are_refused_before_any_method_runs(tmp_path, pic, capsys, options,
                                                                                 words):
    """The dry run stops each method at its first forward pass: a value checked after it (Score-CAM's
    default layer runs the model first) went through, vanilla was written and the bad method failed (exit 1)."""
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", *options], capsys)
    assert rc == 2, err
    assert err.startswith("salience: error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "o").exists()
