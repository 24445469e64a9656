"""95% intervals for screening scores: a score is k correct answers out of n held-out samples.

`wilson_interval` is the Wilson score interval of one binomial proportion: unlike the normal
(Wald) interval it stays inside [0, 1] and keeps its coverage at 0 or n successes, which a small
model's score often is. `difference_interval` is the normal-approximation interval of p2 - p1 for
two independent binomials, used for "GRPO minus SFT", with Agresti and Caffo's adjustment (one
success and one failure added to each side) so that it does not collapse to a point when both
scores are 0 or 100%. Two models scored on the same held-out samples are paired, not independent;
ignoring the pairing widens the interval when both models tend to get the same samples right (the
usual case), so the reported interval is conservative.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


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
