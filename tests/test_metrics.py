"""Metrics on hand-computed values: Wilson interval, mean CI (bootstrap and t), p_n, Push-T score checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fm_policy.eval.metrics import (
    Estimate,
    mean_ci,
    rate_ci,
    success_rate,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # z = 1.96: 0/10 -> hi = z^2/n / (1 + z^2/n) = 0.38416 / 1.38416; 5/10 -> 0.5 -+ 1.96*sqrt(0.034604)/1.38416
        (0, 10, 0.0, 0.27754),
        (10, 10, 0.72246, 1.0),
        (5, 10, 0.23659, 0.76341),
        (1, 2, 0.09453, 0.90547),
    ],
)
def test_wilson_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got_lo, got_hi = wilson_interval(k, n, z=1.96)
    assert got_lo == pytest.approx(lo, abs=1e-4)
    assert got_hi == pytest.approx(hi, abs=1e-4)


def test_wilson_edges_and_errors() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0 < hi < 0.08
    lo, hi = wilson_interval(50, 50)
    assert hi == 1.0 and 0.92 < lo < 1
    for k, n in ((-1, 3), (4, 3), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def test_rate_ci_and_success_rate() -> None:
    est = success_rate([True, False, True, False, True, False, True, False, True, False])
    assert isinstance(est, Estimate)
    assert est.value == 0.5 and est.n == 10 and est.method == "wilson"
    assert (est.lo, est.hi) == pytest.approx(wilson_interval(5, 10))
    assert math.isnan(rate_ci([]).value)
    assert est.fmt() == "0.500 [0.237, 0.763]"


def test_mean_ci_bootstrap_contains_mean_and_is_deterministic() -> None:
    values = np.array([0.1, 0.95, 1.0, 1.0, 0.4, 0.77, 1.0, 0.0, 0.6, 0.85])
    a = mean_ci(values)
    b = mean_ci(values.tolist())
    assert a == b  # fixed seed: same rollouts, same interval
    assert a.value == pytest.approx(values.mean())
    assert a.lo <= a.value <= a.hi
    assert 0.0 <= a.lo < a.value < a.hi <= 1.0
    assert a.method == "bootstrap" and a.n == 10
    # the percentile interval is close to the normal one for this n (sanity, loose)
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert a.hi - a.lo == pytest.approx(2 * 1.96 * se, rel=0.3)
    assert mean_ci(values, seed=1) != a  # the seed is what fixes it


def test_mean_ci_t_interval_hand_computed() -> None:
    # mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.776445 -> half width 2.776445 * 1.581139 / sqrt(5) = 1.963243
    est = mean_ci([1, 2, 3, 4, 5], method="t")
    assert est.value == 3.0
    assert est.lo == pytest.approx(3 - 1.963243, abs=1e-5)
    assert est.hi == pytest.approx(3 + 1.963243, abs=1e-5)


def test_mean_ci_degenerate_inputs() -> None:
    one = mean_ci([0.7])
    assert (one.value, one.lo, one.hi) == (0.7, 0.7, 0.7)
    same = mean_ci([1.0] * 20)
    assert (same.value, same.lo, same.hi) == (1.0, 1.0, 1.0)
    empty = mean_ci([])
    assert math.isnan(empty.value) and empty.n == 0 and empty.fmt() == "n/a"
    with pytest.raises(ValueError, match="finite"):
        mean_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="method"):
        mean_ci([0.1, 0.2], method="normal")  # type: ignore[arg-type]


def test_rate_of_at_least_n_kitchen_style() -> None:
    counts = np.asarray([0, 1, 2, 3, 4, 4, 7, 2, 1, 0])
    for n, expected, k in ((1, 0.8, 8), (2, 0.6, 6), (4, 0.3, 3), (7, 0.1, 1), (8, 0.0, 0)):
        est = rate_ci(counts >= n)
        assert est.value == expected and (est.lo, est.hi) == pytest.approx(wilson_interval(k, 10))
