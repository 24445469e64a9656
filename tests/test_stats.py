"""The 95% intervals of hcm.stats against values computed by hand (and their doctests)."""

from __future__ import annotations

import doctest

import pytest

import hcm.stats
from hcm.stats import difference_interval, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),  # centre .7167, half .2266
        (0, 16, 0.0, 0.1936),  # no success: z^2 / (n + z^2) = 3.8415 / 19.8415
        (16, 16, 0.8064, 1.0),  # all successes: the mirror image
        (50, 100, 0.4038, 0.5962),  # symmetric around 1/2
        (1, 1024, 0.0002, 0.0055),
    ],
)
def test_wilson_interval(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)
    assert lo <= k / n <= hi


def test_wilson_interval_without_samples_knows_nothing():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("k1", "n1", "k2", "n2", "delta", "low", "high"),
    [
        # (k+1)/(n+2): 51/102 and 61/102; se = sqrt(.25/102 + .598*.402/102) = .06934
        (50, 100, 60, 100, 0.1, -0.0379, 0.2339),
        (60, 100, 50, 100, -0.1, -0.2339, 0.0379),  # swapping the sides flips the sign
        # both 0: the unadjusted Wald interval would be [0, 0]; 1/18 each: +-1.96*0.0764
        (0, 16, 0, 16, 0.0, -0.1497, 0.1497),
        (8, 16, 16, 16, 0.5, 0.1904, 0.6985),
    ],
)
def test_difference_interval(k1, n1, k2, n2, delta, low, high):
    d, lo, hi = difference_interval(k1, n1, k2, n2)
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (delta, low, high)


def test_doctests():
    failed, attempted = doctest.testmod(hcm.stats)
    assert attempted >= 3 and failed == 0
