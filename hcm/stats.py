"""95% intervals for screening scores: a score is k correct answers out of n held-out samples.

`wilson_interval` is the Wilson score interval of one binomial proportion: unlike the normal
(Wald) interval it stays inside [0, 1] and keeps its coverage at 0 or n successes, which a small
model's score often is. Two models scored on the same held-out samples are paired:
`paired_difference_interval` is Bonett and Price's adjusted Wald interval of p2 - p1 from the
per-sample differences (only the discordant samples, where exactly one model is right, carry
information; one discordant sample of each kind is added so that the interval does not collapse
when none differ). `difference_interval` treats the two as independent binomials (Agresti and
Caffo's adjustment, one success and one failure added to each side): the fallback when the
per-sample answers are not at hand; it is wider when both models get the same samples right
(the usual case), so conservative.

Over training seeds, `mean_interval` is the Student-t interval of a mean of n runs' scores (n - 1
degrees of freedom: with 3 seeds the half-width is 4.30 standard errors, not 1.96), and
`paired_interval` the same interval of per-seed differences (row minus baseline, trained with the
same seed), which removes what the seed does to both. Without scipy, the t quantiles come from a
table for 1-30 degrees of freedom and the normal quantile beyond (at 31 that is 4% narrower).
`hierarchical_bootstrap` adds the held-out samples' own variation to that of the seeds, and
`minimum_detectable_difference` says how large a gain a design of seeds x samples can detect
(its t quantiles at any level from `student_t_quantile`, exact for integer degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_DRAWS = 2000  # hierarchical_bootstrap's: the 2.5% tail then holds 50 draws
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


def paired_difference_interval(
    only_first: float, only_second: float, n: float, z: float = Z95
) -> tuple[float, float, float]:
    """(p2 - p1, low, high) for two models scored on the same n samples, as proportions:
    `only_first` samples only the first got right, `only_second` only the second. Bonett and
    Price's (2012) adjusted Wald interval: with q1 = (b+1)/(n+2), q2 = (c+1)/(n+2), centre q2 - q1
    and variance (q1 + q2 - (q2 - q1)^2) / (n + 2), the normal approximation on the per-sample
    differences (each -1, 0 or +1).

    >>> [round(x, 4) for x in paired_difference_interval(5, 15, 100)]
    [0.1, 0.0099, 0.1861]
    """
    if n <= 0:
        return math.nan, -1.0, 1.0
    q1, q2 = (only_first + 1) / (n + 2), (only_second + 1) / (n + 2)
    centre = q2 - q1
    se = math.sqrt((q1 + q2 - centre * centre) / (n + 2))
    return (only_second - only_first) / n, max(-1.0, centre - z * se), min(1.0, centre + z * se)


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


def hierarchical_bootstrap(
    differences: Sequence[Sequence[float]], draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds of each seed's mean per-sample difference, and
    its 95% percentile interval by a two-level bootstrap. `differences[s]` holds seed s's
    per-sample differences (row minus baseline correctness: -1, 0, +1). Each draw resamples the
    seeds with replacement, then, within each drawn seed, its samples with replacement (a seed
    drawn twice gets two resamples), and takes the mean of the drawn seeds' means: both what the
    training seed does and which held-out samples were drawn move it. Seeded: reproducible.

    >>> hierarchical_bootstrap([[1.0, 1.0], [1.0, 1.0]])  # no variation at either level
    (1.0, 1.0, 1.0)
    """
    arrays = [np.asarray(d, dtype=np.float64) for d in differences]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("a bootstrap needs at least one seed, each with at least one sample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(arrays), size=(draws, len(arrays)))  # (draws, seeds): a seed
    means = np.empty(picks.shape)  # (draws, seeds): that seed's resampled mean
    for s, values in enumerate(arrays):
        slots = picks == s
        resample = rng.integers(0, values.size, size=(int(slots.sum()), values.size))
        means[slots] = values[resample].mean(axis=1)
    stats = means.mean(axis=1)  # (draws,)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(np.mean([a.mean() for a in arrays])), float(lo), float(hi)


def t_cdf(x: float, dof: int) -> float:
    """P(T <= x) for Student's t with an integer `dof`, in closed form (Abramowitz and Stegun
    26.7.3-4: a finite series in cos(theta), theta = atan(x / sqrt(dof))).

    >>> round(t_cdf(4.302653, 2), 6), t_cdf(0.0, 7)
    (0.975, 0.5)
    """
    if dof < 1:
        raise ValueError(f"the t distribution needs at least 1 degree of freedom, got {dof}")
    theta = math.atan(x / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = 1.0, 0.0
        for k in range(1, (dof - 1) // 2 + 1):
            series += term
            term *= c2 * (2 * k) / (2 * k + 1)
        mass = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, series = 1.0, 0.0
        for k in range(1, dof // 2 + 1):
            series += term
            term *= c2 * (2 * k - 1) / (2 * k)
        mass = math.sin(theta) * series
    return 0.5 + mass / 2  # mass = P(|T| < |x|), signed with x


def student_t_quantile(p: float, dof: int) -> float:
    """The p quantile of Student's t with an integer `dof` (bisection on `t_cdf`).

    >>> round(student_t_quantile(0.8, 2), 3), round(student_t_quantile(0.975, 9), 3)
    (1.061, 2.262)
    """
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -student_t_quantile(1 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        lo, hi = hi, 2 * hi
    for _ in range(100):  # the bracket halves: 2^-100 of it is below float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def minimum_detectable_difference(
    discordance: float,
    seed_sd: float,
    seeds: int,
    n: int,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """The smallest true mean gain (points) that `seeds` training seeds x `n` paired held-out
    samples detect with probability `power` in a two-sided test at level `alpha`.

    The mean gain over seeds has variance (seed_sd^2 + v / n) / seeds: `seed_sd` (points) is the
    spread of the true gain from seed to seed, v the per-sample variance of the paired
    differences (each -1, 0 or +1), which is discordance - gain^2; `discordance` (%, the share
    of samples where exactly one model is right) bounds it from above, so v = 100 * discordance
    points^2 is conservative. The test is a t test on seeds - 1 degrees of freedom, and the gain
    it detects with the given power is (t(1 - alpha/2) + t(power)) standard errors (the usual
    approximation that ignores the t's non-centrality).

    Worked example: 20% discordance, a seed-to-seed sd of 4 points, 3 seeds x 1,024 samples.
    v / n = 100 * 20 / 1024 = 1.953; (16 + 1.953) / 3 = 5.984, se = 2.446 points;
    t(0.975; 2) + t(0.8; 2) = 4.303 + 1.061 = 5.364, so the design detects 13.12 points.
    With 10 seeds: se = sqrt(17.953 / 10) = 1.340, t(0.975; 9) + t(0.8; 9) = 2.262 + 0.883:
    4.21 points.

    >>> round(minimum_detectable_difference(20.0, 4.0, 3, 1024), 2)
    13.12
    >>> round(minimum_detectable_difference(20.0, 4.0, 10, 1024), 2)
    4.21
    """
    if seeds < 2 or n < 1:
        raise ValueError(f"needs at least 2 seeds and 1 sample, got {seeds} and {n}")
    se = math.sqrt((seed_sd**2 + 100 * discordance / n) / seeds)
    dof = seeds - 1
    return (student_t_quantile(1 - alpha / 2, dof) + student_t_quantile(power, dof)) * se


def between_seed_sd(gains: Sequence[float], discordance: float, n: int) -> float:
    """The seed-to-seed sd (points) of a true gain, from observed per-seed gains (points) on `n`
    paired samples: their variance less what sampling `n` samples adds (100 * discordance / n,
    as in `minimum_detectable_difference`), floored at 0.

    >>> round(between_seed_sd([2.0, 6.0, 4.0], 20.0, 1000), 3)  # var 4, sampling 2: sqrt(2)
    1.414
    """
    if len(gains) < 2:
        raise ValueError(f"needs at least 2 seeds' gains, got {len(gains)}")
    mean = sum(gains) / len(gains)
    variance = sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)
    return math.sqrt(max(0.0, variance - 100 * discordance / n))


def seeds_needed(
    difference: float, discordance: float, seed_sd: float, n: int, most: int = 100
) -> int | None:
    """The fewest seeds (2..most) whose design detects `difference` points with 80% power at 5%
    two-sided (`minimum_detectable_difference`); None when even `most` do not.

    >>> seeds_needed(4.22, 20.0, 4.0, 1024)  # the example above: 10 seeds detect 4.21
    10
    """
    for seeds in range(2, most + 1):
        if minimum_detectable_difference(discordance, seed_sd, seeds, n) <= difference:
            return seeds
    return None
