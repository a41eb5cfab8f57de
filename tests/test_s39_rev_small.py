"""Review of merge 9beb9fb (session 39's small fixes).

- ``plots.nice_ticks`` kept only ticks inside ``[lo, hi]`` exactly: an end a float off its round decimal (``0.1 + 0.2``,
  ``0.7 - 0.4``, a data minimum) lost its tick, so an axis could show one label
  (``(1.6e-06, 2.4999999999999998e-06, 3) -> [2e-06]``) where the plots so far had two. The ticks of ordinary
  ranges are those of the algorithm before the merge (``round(k * step, 10)`` with a 1e-9 step tolerance at the
  ends), up to that one's float error (``817548.6508000001`` is now ``817548.6508``).
- ``viz.to_uint8_image`` of a one-channel integer array past 255 (a 16-bit gray image) told to use
  ``m.astype(np.uint8)``, which wraps its values modulo 256.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from salience import SalienceError
from salience.render import plots, viz


def _before(lo: float, hi: float, target: int = 6) -> list[float]:
    """``nice_ticks`` before the merge (the evaluation plots' ticks so far), for ranges with steps over 1e-10."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    ticks, k = [], math.ceil(lo / step - 1e-9)
    while k * step <= hi + 1e-9 * step:
        ticks.append(round(k * step, 10) + 0.0)
        k += 1
    return ticks


def test_an_end_a_float_off_its_round_decimal_keeps_its_tick():
    assert plots.nice_ticks(0.1 + 0.2, 1.0, 10) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert plots.nice_ticks(0.0, 0.7 - 0.4) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert plots.nice_ticks(1.6e-06, 25 * 1e-7, 3) == [2e-06, 2.5e-06]  # was [2e-06]: an axis with one label
    assert plots.nice_ticks(-2e-06, -1.4000000000000001e-06) == [-2e-06, -1.9e-06, -1.8e-06, -1.7e-06, -1.6e-06,
                                                                  -1.5e-06, -1.4e-06]


@pytest.mark.parametrize("d", [-6, -3, 0, 2, 5])
def test_ordinary_ranges_keep_the_ticks_of_the_plots_so_far(d):
    for a in range(-10, 11):
        for b in range(a + 1, a + 13):
            for lo, hi in ((a * 10.0 ** d / 4, b * 10.0 ** d / 4), (a * 10.0 ** d * 0.1, b * 10.0 ** d * 0.1)):
                for target in (3, 6, 10):
                    new, old = plots.nice_ticks(lo, hi, target), _before(lo, hi, target)
                    assert len(new) == len(old), (lo, hi, target, old, new)
                    assert all(abs(n - o) <= 4 * math.ulp(o) for n, o in zip(new, old)), (lo, hi, target, old, new)


def test_a_16_bit_gray_image_is_not_told_to_wrap_into_uint8():
    gray = np.array([[0, 30000], [50000, 65535]], np.uint16)
    with pytest.raises(SalienceError) as e:
        viz.to_uint8_image(gray)
    assert "astype(np.uint8)" not in str(e.value) and "m / 65535" in str(e.value)
    assert viz.to_uint8_image(gray / 65535)[..., 0].tolist() == [[0, 117], [195, 255]]  # the advice: its gray
    with pytest.raises(SalienceError, match=r"astype\(np\.uint8\)"):  # 0..255: uint8 is the advice, as it was
        viz.to_uint8_image(gray // 300)
