"""``with_preprocessing``'s ``size`` and ``resize`` take whole numbers however they come: ``8.0`` (a computed size,
``224 / 0.875``), numpy integers and floats, a 1-D array or tensor of sides; a side that is no whole number >= 1 (8.5,
nan, inf, a bool, a string, 0) is a ``SalienceError``. ``size=8.0`` was refused ("size must be a positive int"), as
``resize=10.0`` and an array of sides: the tests that take them failed before the fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience._core.info import ModelInfo
from salience.loading import preprocess, with_preprocessing

INFO = ModelInfo(name="m", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("size, want", [
    (8.0, (8, 8)), ((8.0, 6.0), (8, 6)), ([8, 6.0], (8, 6)), (np.float64(8.0), (8, 8)), (np.int64(8), (8, 8)),
    ((np.int32(8), np.int64(6)), (8, 6)), (np.array([8, 6]), (8, 6)), (np.array([8.0, 6.0]), (8, 6)),
    (torch.tensor([8, 6]), (8, 6)), (torch.tensor(8), (8, 8)), (np.array(8), (8, 8)), (224 / 0.875 / 32, (8, 8)),
])
def test_whole_sizes_are_taken_as_ints(size, want):
    info = with_preprocessing(INFO, size=size)
    assert info.input_size == want and all(type(v) is int for v in info.input_size)
    assert info == with_preprocessing(INFO, size=want)
    assert preprocess(torch.rand(3, 12, 10), info).shape == (3, *want)


def test_a_whole_float_resize_is_taken_as_an_int():
    info = with_preprocessing(INFO, size=8, resize=10.0)
    assert info.resize == 10 and type(info.resize) is int
    assert info == with_preprocessing(INFO, size=8, resize=10)
    assert with_preprocessing(INFO, size=8, resize=np.float32(10.0)).resize == 10


@pytest.mark.parametrize("size", [8.5, float("nan"), float("inf"), True, (8, True), (8.0, 6.5), "8", 0.0, -8.0,
                                  np.float64(8.5), np.bool_(True), torch.tensor(8.5), np.array([8, 6, 4]),
                                  np.zeros((2, 2))])
def test_other_sizes_are_refused_saying_what_is_taken(size):
    with pytest.raises(SalienceError, match=r"size must be"):
        with_preprocessing(INFO, size=size)


@pytest.mark.parametrize("resize", [10.5, float("nan"), True, 0])
def test_other_resizes_are_refused(resize):
    with pytest.raises(SalienceError, match=r"resize must be a positive int"):
        with_preprocessing(INFO, size=8, resize=resize)
