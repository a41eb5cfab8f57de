"""``with_preprocessing`` checks the input size it ends with: a model's 8192 x 8192 overridden by the user's
``size=224`` was refused; the message of a size past floats said "is more than 1e+308 pixels, more than the ..."."""
import pytest

from salience import SalienceError
from salience._core.info import ModelInfo
from salience.loading.images import with_preprocessing


def test_the_users_size_overrides_a_huge_model_size():
    out = with_preprocessing(ModelInfo(input_size=(8192, 8192)), size=224)
    assert out.input_size == (224, 224)


def test_a_huge_model_size_kept_is_still_refused():
    with pytest.raises(SalienceError, match="input_size 8,192x8,192 is 67,108,864 pixels, more than the 50,000,000"):
        with_preprocessing(ModelInfo(input_size=(8192, 8192)), mean=0.5)


def test_a_size_past_floats_says_more_than_once():
    with pytest.raises(SalienceError) as e:
        with_preprocessing(ModelInfo(input_size=(8, 8)), size=10 ** 300)
    assert str(e.value).count("more than") == 1 and "over 1e+308 pixels" in str(e.value)
