"""A model input size or resize past :data:`salience.loading.images.MAX_INPUT_PIXELS` (50 megapixels, an image file's
default limit) is refused where it is given, with a ``SalienceError`` naming it: ``with_preprocessing(size=1e300)``,
``size=10**9``, ``resize=10**9``, a ``ModelInfo`` with such an input size, ``salience explain --size / --crop /
--resize`` (also negative and zero, before the model is loaded) and ``salience list / visualize --size``. They were
taken until the resize, which failed with torch's "Overflow when unpacking long long", "Storage size calculation
overflowed" or an allocation of terabytes. ``nan``, ``inf``, 0 and negative sizes stay refused; whole floats (224.0)
stay taken."""
from __future__ import annotations

import argparse

import pytest
import torch

from salience import SalienceError
from salience._core.info import ModelInfo
from salience.cli import inputs, main
from salience.cli.common import EXIT_USAGE
from salience.loading import preprocess, resize_crop, with_preprocessing
from salience.loading.images import MAX_INPUT_PIXELS

INFO = ModelInfo(name="m", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
HUGE = [1e300, 10 ** 9, 10 ** 300, (1, 10 ** 9), (8000, 8000), 1e8, (7072, 7072)]


def test_the_cap_is_the_files_default():
    from salience.loading.images import DEFAULT_MAX_PIXELS
    assert MAX_INPUT_PIXELS == DEFAULT_MAX_PIXELS == 50_000_000


@pytest.mark.parametrize("size", HUGE)
def test_huge_sizes_are_refused_where_given(size):
    with pytest.raises(SalienceError, match=r"size .* pixels, more than the 50,000,000"):
        with_preprocessing(INFO, size=size)


@pytest.mark.parametrize("size", [float("inf"), float("nan"), -1, 0, -224.0, float("-inf")])
def test_other_bad_sizes_stay_refused(size):
    with pytest.raises(SalienceError, match=r"size must be"):
        with_preprocessing(INFO, size=size)


@pytest.mark.parametrize("size, want", [(224.0, (224, 224)), ((7071, 7071), (7071, 7071)), ((1, 50_000_000),
                                                                                          (1, 50_000_000))])
def test_sizes_up_to_the_cap_are_taken(size, want):
    assert with_preprocessing(INFO, size=size).input_size == want


@pytest.mark.parametrize("resize", [1e300, 10 ** 9, 7072])
def test_huge_resizes_are_refused(resize):
    with pytest.raises(SalienceError, match=r"resize .* more than the 50,000,000"):
        with_preprocessing(INFO, size=8, resize=resize)
    assert with_preprocessing(INFO, size=8, resize=7071.0).resize == 7071


@pytest.mark.parametrize("info", [ModelInfo(name="x", input_size=(10 ** 9, 10 ** 9)),
                                  ModelInfo(name="x", input_size=(8, 8), resize=10 ** 9)])
def test_a_model_info_so_large_is_refused(info):
    for fn in (resize_crop, preprocess):
        with pytest.raises(SalienceError, match=r"^resize_crop: the ModelInfo's .* more than the 50,000,000"):
            fn(torch.rand(3, 8, 8), info)


def _args(**given) -> argparse.Namespace:
    base = dict(size=None, crop=None, resize=None, resize_mode=None, channels=None, mean=None, std=None, labels=None)
    return argparse.Namespace(**{**base, **given})


@pytest.mark.parametrize("given, flag", [({"size": "1000000000"}, "--size"), ({"size": "8000,8000"}, "--size"),
                                         ({"crop": "100000"}, "--crop"), ({"resize": "1000000000"}, "--resize"),
                                         ({"size": "-5"}, "--size"), ({"size": "0"}, "--size"),
                                         ({"resize": "0"}, "--resize"), ({"size": "224,-1"}, "--size")])
def test_the_flags_are_refused_as_they_are_read(given, flag):
    """Before the model is loaded (read_inputs): negative and zero ones were refused only after it."""
    with pytest.raises(SalienceError, match=rf"^{flag} "):
        inputs.read_inputs(_args(**given))


def test_good_flags_are_read():
    assert inputs.read_inputs(_args(size="224")).preprocessing == {"size": (224,)}
    assert inputs.read_inputs(_args(size="7071,7071", resize="7071")).preprocessing["resize"] == 7071


@pytest.mark.parametrize("command", [["list", "--model", "demo:shapes", "--size", "1000000000"],
                                     ["list", "--model", "demo:shapes", "--size", "0"]])
def test_list_size_is_checked(command, capsys):
    """In process (``salience.cli.main``): a usage error naming ``--size``, not an unexpected exception (which
    ``main`` would report as ``EXIT_INTERNAL``, the in-process form of a traceback)."""
    code = main(command)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--size" in err and "unexpected" not in err, err[-1500:]


def test_visualize_size_is_checked(tmp_path, capsys):
    code = main(["visualize", "--model", "demo:shapes", "--target", "0", "--size", "1000000000",
                 "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--size" in err and "more than the 50,000,000" in err, err[-1500:]
