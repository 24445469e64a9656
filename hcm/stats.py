"""95% intervals for screening scores: a score is k correct answers out of n held-out samples.

`wilson_interval` is the Wilson score interval of one binomial proportion: unlike the normal
(Wald) interval it stays inside [0, 1] and keeps its coverage at 0 or n successes, which a small
model's score often is. `difference_interval` is the normal-approximation interval of p2 - p1 for
two independent binomials, used for "GRPO minus SFT", with Agresti and Caffo's adjustment (one
success and one failure added to each side) so that it does not collapse to a point when both
scores are 0 or 100%. Two models scored on the same held-out samples are paired, not independent;
ignoring the pairing widens the interval when both models tend to get the same samples right (the
usual case), so the reported interval is conservative.

Over training seeds, `mean_interval` is the Student-t interval of a mean of n runs' scores (n - 1
degrees of freedom: with 3 seeds the half-width is 4.30 standard errors, not 1.96), and
`paired_interval` the same interval of per-seed differences (row minus baseline, trained with the
same seed), which removes what the seed does to both. Without scipy, the t quantiles come from a
table for 1-30 degrees of freedom and the normal quantile beyond (at 31 that is 4% narrower).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
# The t distribution's 97.5% quantile for 1..30 degrees of freedom (tests/test_stats.py checks
# each against the integrated density).
T95 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
)  # fmt: skip


def wilson_interval(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion k/n, as proportions in [0, 1].

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    >>> [round(x, 4) for x in wilson_interval(0, 16)]
    [0.0, 0.1936]
    """
    if n <= 0:
        return 0.0, 1.0  # no samples: nothing is known
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(
    k1: float, n1: float, k2: float, n2: float, z: float = Z95
) -> tuple[float, float, float]:
    """(p2 - p1, low, high): the difference of two independent binomial proportions and its
    Agresti-Caffo 95% interval (the normal approximation on (k+1)/(n+2)), as proportions.

    >>> [round(x, 4) for x in difference_interval(50, 100, 60, 100)]
    [0.1, -0.0379, 0.2339]
    """
    if n1 <= 0 or n2 <= 0:
        return math.nan, -1.0, 1.0
    q1, q2 = (k1 + 1) / (n1 + 2), (k2 + 1) / (n2 + 2)
    se = math.sqrt(q1 * (1 - q1) / (n1 + 2) + q2 * (1 - q2) / (n2 + 2))
    centre = q2 - q1
    return k2 / n2 - k1 / n1, max(-1.0, centre - z * se), min(1.0, centre + z * se)


def t_quantile(dof: int) -> float:
    """The Student-t 97.5% quantile with `dof` degrees of freedom (the normal's beyond 30).

    >>> t_quantile(2), t_quantile(30), t_quantile(31) == Z95
    (4.302653, 2.042272, True)
    """
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    return T95[dof - 1] if dof <= len(T95) else Z95


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of n >= 2 values and its 95% Student-t interval,
    mean +- t(n-1) * s / sqrt(n) with s the sample standard deviation (n - 1 in its denominator).

    >>> [round(x, 4) for x in mean_interval([82.0, 84.0, 86.0])]
    [84.0, 79.0317, 88.9683]
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval over runs needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_interval(values: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """(mean difference, low, high): values[i] - base[i] paired (same seed), its t interval.

    >>> [round(x, 4) for x in paired_interval([62.0, 65.0, 66.0], [60.0, 62.0, 64.0])]
    [2.3333, 0.8991, 3.7676]
    """
    if len(values) != len(base):
        raise ValueError(f"{len(values)} values paired with {len(base)} baselines")
    return mean_interval([v - b for v, b in zip(values, base, strict=True)])
