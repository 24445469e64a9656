"""The 95% intervals of hcm.stats against values computed by hand (and their doctests)."""

from __future__ import annotations

import doctest
import math

import pytest

import hcm.stats
from hcm.stats import (
    T95,
    Z95,
    difference_interval,
    hierarchical_bootstrap,
    mean_interval,
    minimum_detectable_difference,
    paired_difference_interval,
    paired_interval,
    student_t_quantile,
    t_quantile,
    wilson_interval,
)


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


def _t_mass(q: float, dof: int, steps: int = 2000) -> float:
    """P(0 < T < q) for Student's t with `dof` degrees of freedom, by Simpson's rule."""

    norm = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)

    def density(t):
        return norm * (1 + t * t / dof) ** (-(dof + 1) / 2)

    h = q / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return (density(0) + inner + density(q)) * h / 3


@pytest.mark.parametrize("dof", range(1, 31))
def test_t_quantiles_leave_2_5_percent_in_each_tail(dof):
    assert abs(_t_mass(T95[dof - 1], dof) - 0.475) < 2e-7
    assert t_quantile(dof) == T95[dof - 1]


def test_t_quantile_is_the_normal_beyond_the_table_and_needs_a_degree_of_freedom():
    assert t_quantile(31) == t_quantile(1000) == Z95
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile(0)


@pytest.mark.parametrize(
    ("values", "mean", "low", "high"),
    [
        # sd 2, se 2/sqrt(3) = 1.1547; t(2) = 4.302653: half-width 4.9683
        ([44.0, 46.0, 48.0], 46.0, 41.0317, 50.9683),
        # sd sqrt(2), se 1; t(1) = 12.706205
        ([60.0, 62.0], 61.0, 48.2938, 73.7062),
        ([50.0, 53.0, 53.0], 52.0, 47.6973, 56.3027),  # sd sqrt(3), se 1; t(2)
        ([70.0, 70.0, 70.0, 70.0], 70.0, 70.0, 70.0),  # no spread, no width
        # 32 values 0..31 (31 dof, beyond the table: z): sd sqrt(88), se 1.65831, half 3.2502
        ([float(v) for v in range(32)], 15.5, 12.2498, 18.7502),
    ],
)
def test_mean_interval(values, mean, low, high):
    m, lo, hi = mean_interval(values)
    assert (round(m, 4), round(lo, 4), round(hi, 4)) == (mean, low, high)


def test_mean_interval_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([50.0])


@pytest.mark.parametrize(
    ("values", "base", "delta", "low", "high"),
    [
        # differences 6, 7, 5: sd 1, se 0.57735, half-width 2.4841. Unpaired, the spread of
        # each side (sd 1.73 and 2) would give a far wider interval.
        ([50.0, 53.0, 53.0], [44.0, 46.0, 48.0], 6.0, 3.5159, 8.4841),
        ([62.0, 65.0, 66.0], [60.0, 62.0, 64.0], 2.3333, 0.8991, 3.7676),  # diffs 2, 3, 2
        ([1.0, 2.0], [1.0, 2.0], 0.0, 0.0, 0.0),  # the same runs: no difference, no width
    ],
)
def test_paired_interval(values, base, delta, low, high):
    d, lo, hi = paired_interval(values, base)
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (delta, low, high)


def test_paired_interval_needs_pairs():
    with pytest.raises(ValueError, match="paired"):
        paired_interval([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("only_first", "only_second", "n", "delta", "low", "high"),
    [
        # q1 = 6/102, q2 = 16/102: centre .09804, var (.21569 - .00961) / 102, se .04495.
        # The same scores (50 and 60 of 100) unpaired: [-0.0379, 0.2339] (above).
        (5, 15, 100, 0.1, 0.0099, 0.1861),
        (15, 5, 100, -0.1, -0.1861, -0.0099),  # swapping the models flips the sign
        # no sample differs: 1/102 each, se sqrt(2/102/102) = .01387, not a point at 0
        (0, 0, 100, 0.0, -0.0272, 0.0272),
        # all 16 go to the second: q2 - q1 = 16/18, se .10798; the top clipped at 1
        (0, 16, 16, 1.0, 0.6773, 1.0),
    ],
)
def test_paired_difference_interval(only_first, only_second, n, delta, low, high):
    d, lo, hi = paired_difference_interval(only_first, only_second, n)
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (delta, low, high)


def test_hierarchical_bootstrap_resamples_seeds_and_samples():
    # no variation within a seed: only the seeds move the mean. Of the 27 equally likely
    # draws of 3 seeds from {0, .1, .2}, "all 0" (1/27 = 3.7%) and "all .2" each exceed the
    # 2.5% tails, so the interval is [0, .2] exactly
    assert hierarchical_bootstrap([[0.0] * 10, [0.1] * 10, [0.2] * 10]) == pytest.approx(
        (0.1, 0.0, 0.2)
    )
    # one seed: only the samples move it; 100 of 1,000 differ by +1: mean .1, and the normal
    # interval .1 +- 1.96 * sqrt(.1 * .9 / 1000) = [.0814, .1186]
    mean, lo, hi = hierarchical_bootstrap([[1.0] * 100 + [0.0] * 900])
    assert mean == pytest.approx(0.1)
    assert lo == pytest.approx(0.0814, abs=0.003) and hi == pytest.approx(0.1186, abs=0.003)
    # seeded: the same draws twice
    data = [[1.0, 0.0, -1.0, 1.0], [0.0, 0.0, 1.0]]
    assert hierarchical_bootstrap(data, seed=3) == hierarchical_bootstrap(data, seed=3)
    with pytest.raises(ValueError, match="at least one"):
        hierarchical_bootstrap([[1.0], []])


@pytest.mark.parametrize(
    ("p", "dof", "expected"),
    [  # printed t tables, 3 decimals
        (0.8, 1, 1.376),
        (0.8, 2, 1.061),
        (0.8, 3, 0.978),
        (0.8, 4, 0.941),
        (0.8, 5, 0.920),
        (0.8, 10, 0.879),
        (0.8, 30, 0.854),
        (0.95, 1, 6.314),
        (0.95, 4, 2.132),
        (0.2, 2, -1.061),  # symmetric
    ],
)
def test_student_t_quantile_against_the_table(p, dof, expected):
    assert round(student_t_quantile(p, dof), 3) == expected


@pytest.mark.parametrize("dof", range(1, 31))
def test_student_t_quantile_gives_the_97_5_table(dof):
    assert student_t_quantile(0.975, dof) == pytest.approx(T95[dof - 1], abs=1e-6)


@pytest.mark.parametrize(
    ("discordance", "seed_sd", "seeds", "n", "expected"),
    [
        # docstring: (16 + 100 * 20 / 1024) / 3 = 5.984, se 2.4463; (4.3027 + 1.0607) * se
        (20.0, 4.0, 3, 1024, 13.12),
        (20.0, 4.0, 10, 1024, 4.21),  # se 1.3399; 2.2622 + 0.8834
        # no seed spread: se sqrt(100 * 10 / 100 / 2) = 2.2361; t(1): 12.7062 + 1.3764
        (10.0, 0.0, 2, 100, 31.49),
    ],
)
def test_minimum_detectable_difference(discordance, seed_sd, seeds, n, expected):
    mdd = minimum_detectable_difference(discordance, seed_sd, seeds, n)
    assert round(mdd, 2) == expected


def test_minimum_detectable_difference_needs_two_seeds():
    with pytest.raises(ValueError, match="2 seeds"):
        minimum_detectable_difference(20.0, 4.0, 1, 1024)


def test_doctests():
    failed, attempted = doctest.testmod(hcm.stats)
    assert attempted >= 11 and failed == 0
