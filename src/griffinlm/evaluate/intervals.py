"""Confidence intervals over seeds and the verdicts they support.

A comparison is called from its 95% interval, never from means alone: "agrees" when the whole
interval lies on the side the paper claims, "disagrees" when it lies wholly on the other side,
"unresolved" when it contains 0. Intervals are Student-t intervals with n - 1 degrees of freedom
(paired over seeds where runs share a seed); the t quantile is computed here (the regularized
incomplete beta function by its continued fraction, then bisection), so no scipy is needed.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean over n values with its two-sided `level` t interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of `values` with its t interval (n - 1 degrees of freedom); infinite for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, level)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The interval of mean(a - b) over pairs (runs that share a seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal counts, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], level)


def one_run_verdict(direction_agrees: bool) -> str:
    """The verdict of a comparison made on a single seed: no interval, so "unresolved", with the
    direction the one run showed."""
    return (f"**unresolved** (one seed, no interval; the single run's direction "
            f"{'agrees' if direction_agrees else 'disagrees'})")


def verdict(interval: Interval, claim_positive: bool = True) -> str:
    """"agrees" if the interval lies wholly on the claimed side of 0, "disagrees" if wholly on
    the other, else "unresolved"."""
    if interval.lo > 0:
        return "agrees" if claim_positive else "disagrees"
    if interval.hi < 0:
        return "disagrees" if claim_positive else "agrees"
    return "unresolved"


def noninferiority_verdict(interval: Interval, margin: float) -> str:
    """The verdict on "not worse by more than `margin`" for a difference where positive is better
    (margin in the difference's units, >= 0): "agrees" if the whole interval lies above -margin,
    "disagrees" if it lies wholly below -margin, else "unresolved"."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if interval.lo > -margin:
        return "agrees"
    if interval.hi < -margin:
        return "disagrees"
    return "unresolved"
