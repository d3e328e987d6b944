"""Paired statistics of a comparison's arms over seeds: a mean difference, its 95 % Student-t
interval and the sign-flip test's p-value, suited to the few seeds a comparison affords; what the
seeds could detect (the paired t-test's power, from the noncentral t distribution); and an
anytime-valid interval, which stays valid when seeds are added until it excludes a margin.

Power: a two-sided 5 % paired t-test with n pairs rejects when |mean| / (sd / sqrt(n)) exceeds
Student's 97.5 % quantile; against a true mean difference delta its statistic is noncentral t with
n - 1 degrees of freedom and noncentrality delta sqrt(n) / sigma. ``detectable`` is the delta it
rejects with 80 % probability, sigma taken as the observed sd.

Anytime-valid interval (``anytime_interval``): the fixed-n t-interval covers the mean 95 % of the
time only at an n fixed in advance; looked at after every seed, and stopped once it excludes a
margin, it excludes the true mean far more often. The interval here is a confidence sequence: the
means mu0 that the one-sample t-test's Bayes factor (a N(0, g) prior on the standardised effect
(mu - mu0) / sigma and the scale-invariant prior 1/sigma; Rouder et al. 2009, Psychon. Bull. Rev.
16:225, eq. 1 with its normal prior) has not yet rejected at 1/alpha. That Bayes factor is the
likelihood ratio of the differences' scale-invariant part, so a nonnegative martingale of mean 1
when the mean is mu0, whatever sigma (Lai 1976, "On confidence sequences", Ann. Statist. 4:265;
Perez-Ortiz, Lardy, de Heide and Grunwald 2024, "E-statistics, group invariance and anytime-valid
testing", Ann. Statist.); by Ville's inequality it ever reaches 1/alpha with probability at most
alpha, so the interval covers the mean at every n at once, and at any n where a data-dependent rule
stops, with probability at least 1 - alpha. It assumes, as the t-interval does, normal differences
(independent seeds), and needs no bound on their variance.
"""

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


ALPHA, POWER = 0.05, 0.8  # the level (``t975``'s) and power behind ``detectable``, ``seeds_needed``
_Z975, _Z80 = 1.959964, 0.841621
# The prior variance of the standardised effect in ``anytime_interval``: fixed before any data (as
# its validity requires); 1, the unit-information choice, makes the interval finite from 5 pairs on
# and 1.6 to 1.7 times the t-interval's width from 10 to 50 (4: finite from 4, 1.75 times).
_MIXTURE_G = 1.0
_erfc = np.frompyfunc(math.erfc, 1, 1)


def nct_cdf(t: float, df: int, nc: float) -> float:
    """P(T <= t) for T noncentral t with ``df`` degrees of freedom and noncentrality ``nc``.

    T = (Z + nc) / S with Z standard normal and S = sqrt(chi2_df / df), so P(T <= t) is the mean over
    S of Phi(t S - nc): integrated by Simpson's rule over 800 intervals spanning S's density (whose
    log is (df - 1) log s - df s^2 / 2 up to a constant) to at least e^-50 of its peak (10 / sqrt(df)
    either side of 1, S's sd being about 1 / sqrt(2 df)), the density normalised on the same grid.
    The integrand is smooth, so the rule is accurate to far below the 1e-4 the tests ask of it."""
    width = 10 / math.sqrt(df)
    s = np.linspace(max(0.0, 1 - width), 1 + width, 801)
    with np.errstate(divide="ignore"):  # log 0 at s = 0: a density of 0 there
        log_density = -df * s**2 / 2 + ((df - 1) * np.log(s) if df > 1 else 0.0)
    weights = np.exp(log_density - log_density.max()) * np.r_[1, np.tile([4, 2], 399), 4, 1]
    phi = 0.5 * _erfc((nc - t * s) / math.sqrt(2)).astype(float)
    return float(weights @ phi / weights.sum())


def t_power(effect: float, n: int) -> float:
    """Power of the two-sided 5 % paired t-test with ``n`` pairs when the true mean difference is
    ``effect`` standard deviations of a pair's difference (both tails)."""
    crit, nc = t975(n - 1), effect * math.sqrt(n)
    return 1 - nct_cdf(crit, n - 1, nc) + nct_cdf(-crit, n - 1, nc)


def detectable(sd: float | None, n: int, power: float = POWER) -> float | None:
    """The smallest true mean difference that a two-sided 5 % paired t-test over ``n`` pairs detects
    with probability ``power``, were the sd of a pair's difference ``sd``; None without a spread."""
    if sd is None or n < 2:
        return None
    lo, hi = 0.0, 1.0  # in sds; power grows with the effect, so bisect
    while t_power(hi, n) < power:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-7 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_power(mid, n) < power else (lo, mid)
    return hi * sd


def seeds_needed(effect: float, sd: float | None, power: float = POWER) -> int | None:
    """The fewest pairs with which a two-sided 5 % paired t-test detects a true mean difference
    ``effect`` with probability ``power``, were the sd of a pair's difference ``sd``; None without a
    spread. The normal approximation's n is a lower bound (the t-test has less power than the
    z-test), from which the search starts."""
    if sd is None:
        return None
    if sd == 0:
        return 2  # no spread: two pairs show any difference (a t-test needs two)
    d = abs(effect) / sd
    hi = max(2, math.ceil(((_Z975 + _Z80) / d) ** 2))
    while t_power(d, hi) < power:
        hi *= 2
    lo = 1  # power(lo) < power <= power(hi): bisect on n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mid < 2 or t_power(d, mid) < power else (lo, mid)
    return hi


def anytime_half_width_t(n: int, alpha: float = ALPHA, g: float = _MIXTURE_G) -> float:
    """The anytime-valid interval's half-width after ``n`` pairs, in units of sd / sqrt(n) (as
    ``t975`` is the t-interval's); inf where it is not yet finite.

    The Bayes factor against mean mu0 is c^-1/2 ((1 + y) / (1 + y / c))^(n / 2) with c = 1 + n g,
    y = T^2 / (n - 1) and T the t statistic against mu0 (module docstring); it stays below 1/alpha
    exactly where (1 + y) / (1 + y / c) < K = (sqrt(c) / alpha)^(2 / n), i.e. where
    y < (K - 1) / (1 - K / c) when K < c (when K >= c, the left side, below c, always is)."""
    c = 1 + n * g
    k = (math.sqrt(c) / alpha) ** (2 / n)
    return math.sqrt((n - 1) * (k - 1) / (1 - k / c)) if k < c else math.inf


def anytime_interval(diffs: list[float], alpha: float = ALPHA) -> list[float] | None:
    """The anytime-valid (1 - alpha) interval of the mean of ``diffs`` (module docstring); None
    while it is the whole line (fewer than 5 pairs at alpha 0.05)."""
    n = len(diffs)
    if n < 2 or math.isinf(half := anytime_half_width_t(n, alpha)):
        return None
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    return [mean - half * sd / math.sqrt(n), mean + half * sd / math.sqrt(n)]


def excludes(interval: list[float] | None, margin: float) -> bool:
    """Does ``interval`` lie wholly beyond ``margin`` on one side of zero (above it, or below its
    negative): a difference larger than the margin, in one direction?"""
    return interval is not None and (interval[0] > margin or interval[1] < -margin)


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


def paired_stats(
    values: list[float], reference: list[float], *, effect: float | None = None, anytime: bool = False
) -> dict[str, Any]:
    """Mean, std and 95 % t-interval of ``values - reference`` (paired by seed), the sign-flip p and
    the smallest difference the seeds could detect (``detectable``); with ``effect``, the seeds a
    difference of that size would need (``seeds_needed``); with ``anytime``, the anytime-valid
    interval (``cs95``)."""
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
        **({"cs95": anytime_interval(diffs)} if anytime else {}),
        "detectable": detectable(sd, n),
        **({"seeds_needed": seeds_needed(effect, sd)} if effect is not None else {}),
        "p_sign_flip": sign_flip_p(diffs),
        "lower": sum(d < 0 for d in diffs),
        "higher": sum(d > 0 for d in diffs),
    }


def summarise(values: list[float]) -> dict[str, float | None]:
    """Mean and standard deviation over seeds; one seed has no spread (null, as in ``paired_stats``)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
