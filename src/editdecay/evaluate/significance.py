"""Uncertainty for edit metrics (ARCHITECTURE "Knowledge probes and metrics"):
percentile-bootstrap intervals on rates, the paired t-test of seed 001 App. J, and
McNemar's test for paired binary outcomes.

Undefined values (``None`` or NaN) are dropped and counted in ``n_undefined``; a sample
with nothing left gives NaN, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import EditdecayError

# At most this many resampled values are held in memory at once.
_CHUNK_ELEMENTS = 4_000_000


class SignificanceInputError(EditdecayError, ValueError):
    """Bad input to a statistic (length mismatch, too few values, bad option)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap interval over ``n`` defined values."""

    estimate: float
    low: float
    high: float
    n: int
    n_undefined: int = 0
    level: float = 0.95

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN when undefined)."""
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class TestResult:
    """Outcome of a paired test. ``df``/``mean_diff`` are set by the t-test, ``b``/``c``
    (discordant counts 1→0 and 0→1) by McNemar; ``method`` names the variant used."""

    __test__ = False  # not a pytest test class

    statistic: float
    p_value: float
    n: int
    method: str
    df: float | None = None
    mean_diff: float | None = None
    b: int | None = None
    c: int | None = None
    n_undefined: int = 0


def _as_float_array(values: Sequence[float | bool | None]) -> np.ndarray:
    """1-D float array with ``None`` mapped to NaN."""
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    if arr.ndim != 1:
        raise SignificanceInputError(f"expected a flat sequence of numbers, got shape {arr.shape}")
    return arr


def _apply_stat(stat: Callable, samples: np.ndarray) -> np.ndarray:
    """``stat`` over each row; uses ``axis=1`` when the callable supports it."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([stat(row) for row in samples], dtype=float)


def bootstrap_ci(
    values: Sequence[float | bool | None],
    stat: Callable = np.mean,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap interval of ``stat`` over ``values`` (NaN/None dropped).

    ``stat`` is a reduction such as ``np.mean`` (called with ``axis=1`` on the
    resampled matrix when it accepts it). Deterministic for a given ``seed``.
    """
    if not 0 < level < 1:
        raise SignificanceInputError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise SignificanceInputError(f"n_boot must be >= 1, got {n_boot}")
    arr = _as_float_array(values)
    defined = arr[~np.isnan(arr)]
    n, n_undef = int(defined.size), int(arr.size - defined.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, n_undef, level)
    estimate = float(stat(defined))
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    boots = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        boots.append(_apply_stat(stat, defined[idx]))
    alpha = (1 - level) / 2
    low, high = np.quantile(np.concatenate(boots), [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), n, n_undef, level)


def rate_ci(
    successes: Sequence[bool | None], n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Bootstrap interval of a success rate (``None`` = undefined outcome, skipped)."""
    return bootstrap_ci(successes, np.mean, n_boot=n_boot, level=level, seed=seed)


def interval_halfwidth(n: int, p: float = 0.5, level: float = 0.95) -> float:
    """Expected half-width of the ``level`` interval of a rate over ``n`` independent
    facts: z·sqrt(p(1−p)/n) (the bootstrap interval of a mean of 0/1 outcomes is close
    to it); ``p`` = 0.5 gives the widest. ``n`` = 0 gives inf."""
    from scipy import stats

    if n < 0 or not 0 <= p <= 1:
        raise SignificanceInputError(f"interval width needs n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if n == 0:
        return math.inf
    return float(stats.norm.ppf(0.5 + level / 2)) * math.sqrt(p * (1 - p) / n)


def n_for_halfwidth(halfwidth: float, p: float = 0.5, level: float = 0.95) -> int:
    """Facts needed for a ``level`` interval of at most ±``halfwidth`` on a rate near ``p``."""
    from scipy import stats

    if not 0 < halfwidth < 1:
        raise SignificanceInputError(f"half-width must lie in (0, 1), got {halfwidth}")
    z = float(stats.norm.ppf(0.5 + level / 2))
    return max(1, math.ceil(z * z * p * (1 - p) / halfwidth**2))


def paired_ttest(a: Sequence[float | None], b: Sequence[float | None]) -> TestResult:
    """Two-sided paired t-test of ``a`` vs ``b`` (seed 001 App. J: ES before vs after
    fine-tuning, paired by configuration). Pairs with an undefined side are dropped;
    otherwise equal to ``scipy.stats.ttest_rel``."""
    from scipy import stats

    x, y = _as_float_array(a), _as_float_array(b)
    if x.size != y.size:
        raise SignificanceInputError(f"paired t-test needs equal lengths, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    n = int(d.size)
    if n < 2:
        raise SignificanceInputError(f"paired t-test needs at least 2 defined pairs, got {n}")
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    df = n - 1
    if se == 0:
        t = math.nan if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    p = math.nan if math.isnan(t) else float(2 * stats.t.sf(abs(t), df))
    return TestResult(t, p, n, "paired_t", df=float(df), mean_diff=mean,
                      n_undefined=int(x.size - n))


def mcnemar(
    before: Sequence[bool | None], after: Sequence[bool | None], exact: bool | None = None
) -> TestResult:
    """McNemar's test on paired binary outcomes; b = #(1→0), c = #(0→1).

    ``exact=None`` uses the exact two-sided binomial test when b + c < 25, otherwise the
    continuity-corrected chi-square (|b−c|−1)²/(b+c) on 1 df. b + c == 0 gives p = 1.
    The exact statistic is min(b, c).
    """
    from scipy import stats

    if len(before) != len(after):
        raise SignificanceInputError(
            f"McNemar needs equal lengths, got {len(before)} and {len(after)}")
    pairs = [(bool(u), bool(v)) for u, v in zip(before, after) if u is not None and v is not None]
    n, n_undef = len(pairs), len(before) - len(pairs)
    b = sum(1 for u, v in pairs if u and not v)
    c = sum(1 for u, v in pairs if v and not u)
    m = b + c
    use_exact = m < 25 if exact is None else exact
    if m == 0:
        return TestResult(0.0, 1.0, n, "exact" if use_exact else "chi2", b=0, c=0,
                          n_undefined=n_undef)
    if use_exact:
        k = min(b, c)
        p = min(1.0, 2 * float(stats.binom.cdf(k, m, 0.5)))
        return TestResult(float(k), p, n, "exact", b=b, c=c, n_undefined=n_undef)
    chi2 = (abs(b - c) - 1) ** 2 / m
    return TestResult(chi2, float(stats.chi2.sf(chi2, 1)), n, "chi2", b=b, c=c, n_undefined=n_undef)
