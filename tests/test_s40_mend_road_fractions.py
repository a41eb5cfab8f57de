"""ROAD's fractions as a 0-d numpy array are one number, refused with the SalienceError a 0-d tensor gets (it escaped as
numpy's raw "iteration over a 0-d array" TypeError); a 1-D array is its values."""
import numpy as np
import pytest

from salience import SalienceError
from salience.evidence.road import _check_fractions


@pytest.mark.parametrize("given", [np.array(0.5), np.float64(0.5)])
def test_a_0d_array_is_refused_as_no_sequence(given):
    with pytest.raises(SalienceError, match="must be a sequence of fractions"):
        _check_fractions(given)


def test_a_1d_array_gives_its_values():
    assert _check_fractions(np.array([0.25, 0.5])) == [0.25, 0.5]
