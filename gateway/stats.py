"""The statistics behind the canary's triggers: exact binomial confidence bounds.

Why exact (Clopper-Pearson) and not a normal approximation: the error-rate trigger judges rates around 0.1% on
samples of a few hundred to a few thousand requests, where the normal approximation's bound is badly off (it can
go below zero, and it under-covers for small counts); the exact bound holds its stated error probability at any
count, so a single error in a few hundred requests is not read as evidence.
"""

from __future__ import annotations

import math


def error_rate_lower_bound(errors: int, n: int, confidence: float) -> float:
    """Exact one-sided (Clopper-Pearson) lower confidence bound of a binomial proportion.

    The largest p with P(X >= errors | n, p) <= 1 - confidence, found by bisection on the binomial tail.
    """
    if errors <= 0 or n <= 0:
        return 0.0
    alpha = 1.0 - confidence
    lo, hi = 0.0, errors / n
    for _ in range(60):
        mid = (lo + hi) / 2
        if _upper_tail(errors, n, mid) > alpha:
            hi = mid
        else:
            lo = mid
    return lo


def _upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), computed as 1 - P(X <= k-1) in log space (stable for small p)."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    log_coef = 0.0  # log C(n, 0)
    for i in range(k):
        if i > 0:
            log_coef += math.log(n - i + 1) - math.log(i)
        total += math.exp(log_coef + i * log_p + (n - i) * log_q)
    return max(0.0, 1.0 - total)
