"""Paired statistics of a comparison's arms over seeds: a mean difference, its 95 % Student-t
interval and the sign-flip test's p-value, suited to the few seeds a comparison affords."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    """Student's t 97.5 % quantile (table up to 30 df, Cornish-Fisher expansion beyond)."""
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired sign-flip (permutation) test of mean difference 0.

    Exact for up to 20 pairs (all 2^n sign patterns), else estimated from 200,000 random
    patterns (fixed seed); it assumes only that, under the null
    hypothesis, each difference is as likely positive as negative, which suits small N.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return float("nan")
    if n <= 20:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(200_000, n))
    observed = abs(d.mean())
    return float(np.mean(np.abs((signs * d).mean(1)) >= observed - 1e-12))


def paired_stats(values: list[float], reference: list[float]) -> dict[str, Any]:
    """Mean, std and 95 % t-interval of ``values - reference`` (paired by seed), plus the sign-flip p."""
    diffs = [v - r for v, r in zip(values, reference)]
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:  # one seed has no spread: null, not NaN (which strict JSON readers refuse)
        sd, ci = None, None
    else:
        sd = float(np.std(diffs, ddof=1))
        half = t975(n - 1) * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {
        "n": n,
        "mean": mean,
        "std": sd,
        "ci95": ci,
        "p_sign_flip": sign_flip_p(diffs),
        "lower": sum(d < 0 for d in diffs),
        "higher": sum(d > 0 for d in diffs),
    }


def summarise(values: list[float]) -> dict[str, float | None]:
    """Mean and standard deviation over seeds; one seed has no spread (null, as in ``paired_stats``)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
