"""The statistics behind the canary's triggers: exact binomial bounds, a two-sample bound and the minimum sample.

Why exact (Clopper-Pearson) and not a normal approximation: the error-rate and latency triggers judge proportions
(0.1% errors, 5% of requests over the latency threshold) on samples of a few hundred to a few thousand requests,
where the normal approximation's bound is badly off (it can go below zero, and it under-covers for small counts);
the exact bound holds its stated error probability at any count, so a single error in a few hundred requests is
not read as evidence. The bound is the beta quantile (``scipy.special.betaincinv``): constant time whatever the
counts, a few microseconds (the bisection it replaces grew with the error count and took 0.7 s at 20,000 errors).

Every function here takes counts that may come from outside (replicas' published numbers): impossible ones
(negative, more errors than requests) raise ``ValueError`` naming them, so callers can reject them at the edge.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from scipy.special import betaincinv, ndtri
from scipy.stats import binom

__all__ = ["check_counts", "difference_lower_bound", "error_rate_lower_bound", "error_rate_upper_bound",
           "minimum_sample", "outcome_lower_bound", "wilson"]


def check_counts(k: int, n: int, what: str = "count") -> None:
    """ValueError unless 0 <= k <= n (whole numbers): the edge where impossible inputs stop."""
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int):
        raise ValueError(f"{what}: {k!r} of {n!r} are not whole numbers")
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"{what}: {k} of {n} is impossible")


def error_rate_lower_bound(errors: int, n: int, confidence: float) -> float:
    """Exact one-sided (Clopper-Pearson) lower confidence bound of a binomial proportion: the largest p with
    P(X >= errors | n, p) <= 1 - confidence, which is the (1 - confidence) quantile of Beta(errors, n - errors + 1).
    """
    check_counts(errors, n, "errors")
    if errors == 0:
        return 0.0
    if errors == n:  # closed form, exact where the quantile function loses digits
        return float((1.0 - confidence) ** (1.0 / n))
    return float(betaincinv(errors, n - errors + 1, 1.0 - confidence))


def error_rate_upper_bound(errors: int, n: int, confidence: float) -> float:
    """Exact one-sided upper confidence bound (Clopper-Pearson): 1.0 without a sample."""
    check_counts(errors, n, "errors")
    if errors == n:
        return 1.0
    if errors == 0:
        return float(1.0 - (1.0 - confidence) ** (1.0 / n))
    return float(betaincinv(errors + 1, n - errors, confidence))


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of k/n at normal quantile z: (lower, upper); (0, 1) without a sample."""
    check_counts(k, n, "labels")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_lower_bound(k_s: int, n_s: int, k_c: int, n_c: int, scale: float, confidence: float) -> float:
    """A one-sided lower confidence bound of ``scale * p_s - p_c`` (stable's proportion, scaled, minus the
    candidate's): the MOVER construction (Zou and Donner) from each side's Wilson score interval.

    Why this one: it is closed form (constant time), it keeps the Wilson interval's good coverage at small counts
    and near 0 or 1 where the Wald difference fails, and it stays inside the parameter space. With the margin as
    the null hypothesis (``scale = 1 - margin`` for a relative margin), a candidate *equal* to stable gives a
    bound below zero except with probability about 1 - confidence."""
    z = float(ndtri(confidence))
    ps, pc = k_s / n_s if n_s else 0.0, k_c / n_c if n_c else 0.0
    low_s, _ = wilson(k_s, n_s, z)
    _, high_c = wilson(k_c, n_c, z)
    estimate = scale * ps - pc
    return estimate - math.sqrt((scale * (ps - low_s)) ** 2 + (high_c - pc) ** 2)


def outcome_lower_bound(n_s: Any, sum_s: Any, sq_s: Any, n_c: Any, sum_c: Any, sq_c: Any, scale: float,
                        confidence: float) -> Any:
    """A one-sided lower confidence bound of ``scale * mean_s - mean_c`` for outcomes given as count, sum and sum
    of squares per side (normal approximation, each side's sample variance): the business-metric trigger's
    statistic. For 0/1 outcomes it is the two-proportion (Wald) bound.

    The candidate's variance is taken as at least the stable color's: a candidate sample of rare events (a
    handful of conversions in a hundred outcomes, or none) has a sample variance far below its true one, and the
    plain bound then reads "no conversion yet" as proof of a drop. Under the null hypothesis the candidate is
    like stable, so stable's variance is the honest floor; a candidate truly more variable keeps its own.

    Written with numpy operations so that the simulation (``gateway.canary_outcomes``) evaluates thousands of
    rollouts in one call with exactly the function the analysis uses; sides need at least one outcome."""
    mean_s, mean_c = sum_s / n_s, sum_c / n_c
    var_s = np.maximum(sq_s - sum_s * mean_s, 0.0) / np.maximum(n_s - 1, 1)
    var_c = np.maximum(np.maximum(sq_c - sum_c * mean_c, 0.0) / np.maximum(n_c - 1, 1), var_s)
    se = np.sqrt(scale * scale * var_s / n_s + var_c / n_c)
    return scale * mean_s - mean_c - float(ndtri(confidence)) * se


@functools.lru_cache(maxsize=256)
def minimum_sample(p0: float, p1: float, confidence: float, power: float) -> int:
    """The smallest sample n at which the exact trigger "lower bound above ``p0`` at ``confidence``" fires with
    probability at least ``power`` for a true proportion ``p1`` (> p0): the evidence a stage must hold before it
    can pass, so that a candidate at ``p1`` cannot slip through a stage too short to catch it.

    The power of the exact test is a sawtooth in n; the search finds the first n where it reaches ``power`` on a
    doubling-then-bisecting walk (cached per policy: a few milliseconds once, nothing after)."""
    if not (0.0 <= p0 < p1 <= 1.0):
        raise ValueError(f"minimum sample: need 0 <= {p0} < {p1} <= 1")
    alpha = 1.0 - confidence

    def reaches(n: int) -> bool:
        critical = int(binom.isf(alpha, n, p0)) + 1  # the fewest errors that fire the trigger at n
        return float(binom.sf(critical - 1, n, p1)) >= power

    hi = 1
    while not reaches(hi):
        hi *= 2
        if hi > 1 << 40:  # pragma: no cover - unreachable for p1 > p0
            raise ValueError("minimum sample: unreachable power")
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
