"""Paired comparisons over seeds: 95% paired t-intervals and a verdict per claim.

Two methods run with the same seed see the same data order and are scored on the same samples, so the
per-seed difference removes most of the seed-to-seed noise. With 5 seeds a bootstrap of the mean is
unreliable (it has only 126 distinct resamples and is too narrow); the t-interval with df = n - 1 is
the standard small-sample choice and is exact if the differences are normal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    p: float = math.nan  # two-sided paired t-test of "mean difference = 0"

    def verdict(self) -> str:
        """For a claim "the difference is > 0": held if the interval excludes 0 from above, did not
        hold if it excludes 0 from below, else inconclusive (also with fewer than 2 pairs)."""
        if self.n < 2 or math.isnan(self.low):
            return INCONCLUSIVE
        return HELD if self.low > 0 else NOT_HELD if self.high < 0 else INCONCLUSIVE

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_interval(a, b, level: float = 0.95) -> Interval:
    """Interval for mean(a - b) from paired samples (a[i], b[i] share seed i)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)) if sd > 0 else float(mean == 0)
    return Interval(mean, mean - half, mean + half, n, p)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate): the i-th smallest p times (m - i),
    made monotone and capped at 1. A claim's verdict at level 0.05 then uses `adjusted < 0.05`."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return [float(x) for x in out]


def corrected_verdict(interval: Interval, adjusted_p: float, alpha: float = 0.05) -> str:
    """The verdict of "the difference is > 0" from a multiplicity-adjusted p-value."""
    if interval.n < 2 or math.isnan(adjusted_p) or adjusted_p >= alpha:
        return INCONCLUSIVE
    return HELD if interval.mean > 0 else NOT_HELD
