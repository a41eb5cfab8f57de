"""``plots.nice_ticks`` for any finite ``lo < hi`` whose span ``hi - lo`` is a finite float: its ticks are distinct,
increasing, inside ``[lo, hi]`` (or within ``1e-9`` step of it) and multiples of a step of 1, 2, 2.5 or 5 times a power of ten. It rounded each tick
to 10 decimals (``round(k * step, 10)``), so a range under 1e-10 gave one value repeated (``(0, 1e-12)``: six
``0.0``), and a subnormal one (``(0, 1e-320)``) the same; a range of 5e-324 (one subnormal step) raised Python's
"math domain error" (``(hi - lo) / 6`` underflowed to 0 before its logarithm)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from salience import SalienceError
from salience.render import plots

TINY = 5e-324  # the smallest positive float (subnormal)


def _check(lo: float, hi: float, target: int = 6) -> list[float]:
    ticks = plots.nice_ticks(lo, hi, target)
    assert all(isinstance(t, float) and math.isfinite(t) for t in ticks), (lo, hi, ticks)
    assert all(a < b for a, b in zip(ticks, ticks[1:])), (lo, hi, ticks)  # distinct and increasing
    # inside [lo, hi], or within 1e-9 step of it (an end a float off its round decimal keeps its tick)
    slack = (Fraction(ticks[1]) - Fraction(ticks[0])) / 10 ** 9 if len(ticks) > 1 else 0
    slack += Fraction(math.ulp(max(abs(lo), abs(hi))))
    assert all(Fraction(lo) - slack <= Fraction(t) <= Fraction(hi) + slack for t in ticks), (lo, hi, ticks)
    return ticks


def _floats_between(lo: float, hi: float) -> int:
    """How many floats lie in ``[lo, hi]`` (at most 10**6 counted)."""
    n, v = 1, lo
    while v < hi and n < 10 ** 6:
        v, n = math.nextafter(v, math.inf), n + 1
    return n


@pytest.mark.parametrize("e", range(-323, 308))
def test_ticks_of_zero_to_a_power_of_ten_are_distinct_round_and_many(e):
    hi = float(f"1e{e}")  # the decimal, correctly rounded (10.0 ** 23 is one float below)
    ticks = _check(0.0, hi)
    if e >= -320:  # at least 60 subnormal steps: room for the 6 intervals asked
        assert len(ticks) >= 5, (hi, ticks)
        assert ticks[0] == 0.0 and ticks[-1] == hi, (hi, ticks)
    step = Fraction(ticks[1]) - Fraction(ticks[0]) if len(ticks) > 1 else None
    if step is not None and e >= -300:  # normal floats: the ticks are the decimals k * step, correctly rounded
        mantissa = step / Fraction(10) ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, Fraction(5, 2), 5)) < Fraction(1, 10 ** 9), (hi, ticks)


@pytest.mark.parametrize("e", range(-320, 308, 7))
def test_ticks_of_symmetric_and_offset_ranges(e):
    for lo, hi in ((-(10.0 ** e), 10.0 ** e), (10.0 ** e, 1.5 * 10.0 ** e), (-3 * 10.0 ** e, -(10.0 ** e))):
        ticks = _check(lo, hi)
        if e >= -300:
            assert len(ticks) >= 2, (lo, hi, ticks)


@pytest.mark.parametrize("lo", [0.0, 1.0, -1.0, 1e-300, 3.7e200, -2.5e-310, 1e308])
@pytest.mark.parametrize("ulps", [1, 2, 3, 7, 50, 1000])
def test_ranges_a_few_floats_wide_give_distinct_ticks(lo, ulps):
    """A range of a few floats (``[1, 1 + 2.2e-16]``): the ticks cannot be more than the floats in it."""
    hi = lo
    for _ in range(ulps):
        hi = math.nextafter(hi, math.inf)
    ticks = _check(lo, hi)
    assert len(ticks) <= _floats_between(lo, hi)


def test_the_old_cases():
    assert plots.nice_ticks(0, 1e-320) == [0.0, 2e-321, 4e-321, 6e-321, 8e-321, 1e-320]
    assert plots.nice_ticks(0, 1e-12) == [0.0, 2e-13, 4e-13, 6e-13, 8e-13, 1e-12]
    assert plots.nice_ticks(0, TINY) == [0.0, TINY]
    assert plots.nice_ticks(-0.2, 1.0) == [-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # exact decimals, not approx
    assert plots.nice_ticks(0.0, 25.0) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    assert plots.nice_ticks(1e300, 2e300) == [1e300, 1.2e300, 1.4e300, 1.6e300, 1.8e300, 2e300]
    assert plots.nice_ticks(-1.0, 0.0)[-1] == 0.0 and math.copysign(1, plots.nice_ticks(-1.0, 0.0)[-1]) == 1


def test_ranges_at_the_largest_floats():
    """The step past the range's end is over the largest float there: it is skipped, not an OverflowError."""
    big = 1.7976931348623157e308
    assert plots.nice_ticks(1.7e308, 1.79e308) == [1.7e308, 1.72e308, 1.74e308, 1.76e308, 1.78e308]
    assert plots.nice_ticks(-big, -1.7e308) == [-1.78e308, -1.76e308, -1.74e308, -1.72e308, -1.7e308]
    _check(math.nextafter(big, 0), big)
    _check(0.0, big)


def test_a_span_that_overflows_is_still_refused():
    """``hi - lo`` must be a float: ``line_plot`` divides by it (``(v - lo) / (hi - lo)``)."""
    with pytest.raises(SalienceError, match="too wide"):
        plots.nice_ticks(-1e308, 1e308)
