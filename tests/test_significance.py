"""Bootstrap intervals, paired t-test and McNemar against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from editdecay.errors import EditdecayError
from editdecay.evaluate.significance import (
    Interval, bootstrap_ci, mcnemar, paired_ttest, rate_ci,
)


# --- bootstrap ---------------------------------------------------------------------------

def _bernoulli(n: int, k: int) -> list[bool]:
    return [True] * k + [False] * (n - k)


def test_bootstrap_contains_estimate_and_is_deterministic():
    vals = np.random.default_rng(1).normal(3.0, 1.0, size=40)
    a = bootstrap_ci(vals, seed=7)
    b = bootstrap_ci(vals, seed=7)
    assert a == b
    assert a.estimate == pytest.approx(vals.mean())
    assert a.low < a.estimate < a.high
    assert a.n == 40 and a.n_undefined == 0
    assert bootstrap_ci(vals, seed=8) != a


def test_bootstrap_halfwidth_n50_p05_is_about_14_points():
    iv = rate_ci(_bernoulli(50, 25))
    assert iv.estimate == 0.5
    # normal approximation: 1.96 * sqrt(.25/50) = 0.1386
    assert iv.half_width == pytest.approx(0.14, abs=0.03)
    assert iv.low == pytest.approx(0.36, abs=0.03)
    assert iv.high == pytest.approx(0.64, abs=0.03)


def test_bootstrap_narrows_with_n():
    widths = [rate_ci(_bernoulli(n, n // 2)).half_width for n in (20, 80, 320, 1280)]
    assert all(w1 > w2 for w1, w2 in zip(widths, widths[1:]))
    # shrinks like 1/sqrt(n): quadrupling n halves the width
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.2)


def test_bootstrap_level_widens_interval():
    vals = _bernoulli(60, 20)
    assert rate_ci(vals, level=0.99).half_width > rate_ci(vals, level=0.8).half_width


def test_bootstrap_drops_nan_and_none():
    iv = bootstrap_ci([1.0, math.nan, 0.0, None, 1.0, 1.0])
    assert iv.n == 4 and iv.n_undefined == 2
    assert iv.estimate == pytest.approx(0.75)
    assert 0.0 <= iv.low <= iv.high <= 1.0


def test_bootstrap_empty_is_nan():
    for vals in ([], [None, None], [math.nan]):
        iv = bootstrap_ci(vals)
        assert iv.n == 0
        assert math.isnan(iv.estimate) and math.isnan(iv.low) and math.isnan(iv.high)
    assert bootstrap_ci([None, None]).n_undefined == 2


def test_bootstrap_custom_stat_and_degenerate_sample():
    vals = [1.0, 2.0, 3.0, 100.0]
    iv = bootstrap_ci(vals, stat=np.median, n_boot=2000)
    assert iv.estimate == 2.5
    assert iv.low >= 1.0 and iv.high <= 100.0
    # a stat without an axis argument still works
    iv2 = bootstrap_ci(vals, stat=lambda x: float(np.max(x)), n_boot=500)
    assert iv2.estimate == 100.0 and iv2.high == 100.0
    const = bootstrap_ci([0.3] * 10)
    assert const.low == const.high == const.estimate == pytest.approx(0.3)


def test_bootstrap_percentiles_match_manual_resampling():
    vals = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    iv = bootstrap_ci(vals, n_boot=3000, seed=3)
    rng = np.random.default_rng(3)
    boots = vals[rng.integers(0, vals.size, size=(3000, vals.size))].mean(axis=1)
    assert (iv.low, iv.high) == tuple(np.quantile(boots, [0.025, 0.975]))


def test_bootstrap_bad_options():
    with pytest.raises(EditdecayError):
        bootstrap_ci([1, 2], level=1.5)
    with pytest.raises(EditdecayError):
        bootstrap_ci([1, 2], n_boot=0)


def test_interval_is_dataclass():
    iv = Interval(0.5, 0.4, 0.6, 10)
    assert iv.half_width == pytest.approx(0.1)


# --- paired t-test ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_ttest_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.6, 1.0, size=24)
    b = a - rng.normal(0.05, 0.08, size=24)
    res = paired_ttest(a, b)
    ref = stats.ttest_rel(a, b)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.n == 24 and res.df == 23
    assert res.mean_diff == pytest.approx(float(np.mean(a - b)))


def test_paired_ttest_hand_computed():
    # d = [1, 2, 3]: mean 2, sd 1, t = 2 / (1/sqrt(3)) = 2*sqrt(3), df 2
    res = paired_ttest([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert res.statistic == pytest.approx(t)
    # t distribution with 2 df: sf(t) = (1 - t/sqrt(t^2 + 2)) / 2
    assert res.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))
    # direction matters for the sign, not the p-value
    rev = paired_ttest([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert rev.statistic == pytest.approx(-t) and rev.p_value == pytest.approx(res.p_value)


def test_paired_ttest_drops_undefined_pairs():
    a = [0.9, 0.8, None, 0.7, math.nan, 0.95]
    b = [0.7, 0.75, 0.5, 0.6, 0.4, 0.85]
    res = paired_ttest(a, b)
    ref = stats.ttest_rel([0.9, 0.8, 0.7, 0.95], [0.7, 0.75, 0.6, 0.85])
    assert res.n == 4 and res.n_undefined == 2
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.p_value == pytest.approx(ref.pvalue)


def test_paired_ttest_errors():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ttest([1, 2, 3], [1, 2])
    with pytest.raises(EditdecayError, match="at least 2"):
        paired_ttest([1.0], [2.0])
    with pytest.raises(EditdecayError, match="at least 2"):
        paired_ttest([1.0, None], [2.0, 3.0])


def test_paired_ttest_zero_variance():
    same = paired_ttest([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(same.statistic) and math.isnan(same.p_value)
    shifted = paired_ttest([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert shifted.statistic == math.inf and shifted.p_value == 0.0


# --- McNemar ---------------------------------------------------------------------------

def _vectors(a: int, b: int, c: int, d: int) -> tuple[list[bool], list[bool]]:
    """a pairs 1→1, b pairs 1→0, c pairs 0→1, d pairs 0→0."""
    before = [True] * (a + b) + [False] * (c + d)
    after = [True] * a + [False] * b + [True] * c + [False] * d
    return before, after


def test_mcnemar_exact_hand_computed():
    before, after = _vectors(20, 10, 3, 7)
    res = mcnemar(before, after)
    assert (res.b, res.c, res.n) == (10, 3, 40)
    assert res.method == "exact"
    expected = 2 * sum(math.comb(13, k) for k in range(4)) / 2**13  # 2*P(Bin(13,.5) <= 3)
    assert expected == pytest.approx(0.0922852, abs=1e-6)
    assert res.p_value == pytest.approx(expected, rel=1e-12)
    # symmetric in b and c
    assert mcnemar(after, before).p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_chi2_hand_computed():
    before, after = _vectors(5, 30, 12, 9)
    res = mcnemar(before, after)
    assert (res.b, res.c) == (30, 12)
    assert res.method == "chi2"
    stat = (abs(30 - 12) - 1) ** 2 / 42
    assert res.statistic == pytest.approx(stat)
    assert res.p_value == pytest.approx(stats.chi2.sf(stat, 1))
    # chi-square with 1 df: sf(x) = erfc(sqrt(x / 2))
    assert res.p_value == pytest.approx(math.erfc(math.sqrt(stat / 2)), rel=1e-9)
    assert res.p_value == pytest.approx(0.00871, abs=1e-5)


def test_mcnemar_exact_switch_and_override():
    small = mcnemar(*_vectors(0, 15, 9, 0))  # b + c = 24 < 25
    assert small.method == "exact"
    big = mcnemar(*_vectors(0, 15, 10, 0))  # b + c = 25
    assert big.method == "chi2"
    forced = mcnemar(*_vectors(0, 15, 10, 0), exact=True)
    assert forced.method == "exact"
    assert forced.p_value == pytest.approx(2 * stats.binom.cdf(10, 25, 0.5))
    assert mcnemar(*_vectors(0, 10, 3, 0), exact=False).method == "chi2"


def test_mcnemar_no_discordant_pairs_and_equal_counts():
    res = mcnemar([True, False, True], [True, False, True])
    assert res.p_value == 1.0 and res.b == 0 and res.c == 0
    assert mcnemar(*_vectors(1, 4, 4, 1)).p_value == 1.0  # exact, b == c


def test_mcnemar_skips_undefined_and_checks_length():
    res = mcnemar([True, None, True, False], [False, True, None, True])
    assert (res.b, res.c, res.n, res.n_undefined) == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar([True], [True, False])
