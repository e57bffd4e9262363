"""Evaluation metrics with confidence intervals: Push-T coverage score, success rates, Kitchen-style p_n.

Two Push-T numbers are reported side by side because papers mix them up (docs/evaluation.md, "Score and success"):
- **coverage score** = mean over episodes of the episode's max reward, where reward = clip(coverage / 0.95, 0, 1)
  (diffusion_policy's `test/mean_score`). Its 95% interval is a **bootstrap percentile** interval over episodes
  (10,000 resamples, fixed seed 0, so the same rollouts always give the same interval); a Student-t interval is
  available with `method="t"` (needs scipy).
- **success rate** = fraction of episodes with `is_success` at any step (coverage > 0.95), with a **Wilson** score
  interval, which stays inside [0, 1] and is not degenerate at 0/n or n/n (unlike the normal approximation).

Kitchen's p_n (fraction of episodes completing at least n tasks, with its interval) is
`rate_ci(np.asarray(counts) >= n)` (see `fm_policy.envs.kitchen.kitchen_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Z_95 = 1.959963984540054
"""Two-sided 95% standard-normal quantile."""

CIMethod = Literal["bootstrap", "t"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval [lo, hi] over `n` episodes; `method` names the interval."""

    value: float
    lo: float
    hi: float
    n: int
    method: str
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        """`0.812 [0.745, 0.870]`."""
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `successes / n` (default 95%).

    n = 0 gives the uninformative (0, 1). The bounds are exact 0 / 1 at 0/n and n/n.
    """
    successes, n = int(successes), int(n)
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def _as_1d(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def mean_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    method: CIMethod = "bootstrap",
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Estimate:
    """Mean of `values` with a confidence interval.

    `bootstrap` (default): percentile interval of the means of `n_resamples` resamples with replacement, drawn from
    `np.random.default_rng(seed)`: deterministic, no normality assumption (Push-T scores pile up at 1.0).
    `t`: mean +- t_{(1+c)/2, n-1} * s / sqrt(n) (scipy). One value gives a zero-width interval; none gives NaN.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arr = _as_1d(values, "values")
    n = arr.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, method, confidence)
    mean = float(arr.mean())
    if n == 1 or np.all(arr == arr[0]):
        return Estimate(mean, mean, mean, n, method, confidence)
    alpha = 1.0 - confidence
    if method == "bootstrap":
        if n_resamples < 100:
            raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
        rng = np.random.default_rng(seed)
        means = np.empty(n_resamples)
        rows = max(1, 2_000_000 // n)  # bounded memory for long value lists
        for start in range(0, n_resamples, rows):
            stop = min(n_resamples, start + rows)
            means[start:stop] = arr[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    elif method == "t":
        try:
            from scipy import stats
        except ImportError as err:  # pragma: no cover - scipy is usually present
            raise ImportError("mean_ci(method='t') needs scipy; use method='bootstrap'") from err
        half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * float(arr.std(ddof=1)) / math.sqrt(n)
        lo, hi = mean - half, mean + half
    else:
        raise ValueError(f"method must be 'bootstrap' or 't', got {method!r}")
    # a percentile interval always contains the sample mean up to resampling noise; make that exact
    return Estimate(mean, float(min(lo, mean)), float(max(hi, mean)), n, method, confidence)


def rate_ci(flags: Sequence[bool] | np.ndarray, z: float = Z_95) -> Estimate:
    """Fraction of true `flags` with its Wilson interval."""
    arr = np.asarray(flags, dtype=bool).reshape(-1)
    n, k = int(arr.size), int(arr.sum())
    lo, hi = wilson_interval(k, n, z)
    return Estimate(k / n if n else math.nan, lo, hi, n, "wilson")


def success_rate(successes: Sequence[bool] | np.ndarray) -> Estimate:
    """Fraction of successful episodes with a 95% Wilson interval."""
    return rate_ci(successes)


# ------------------------------------------------------------------------------------- comparisons over training seeds
def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count of one metric over training seeds."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def seed_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Difference of means a - b over training seeds, with its standard error (unpooled: the two groups may differ
    in spread and in count)."""
    return {"diff": a["mean"] - b["mean"],
            "se": math.sqrt(a["std"] ** 2 / max(a["n"], 1) + b["std"] ** 2 / max(b["n"], 1))}


def seed_verdict(a: dict[str, float], b: dict[str, float], higher_is_better: bool = True) -> str:
    """win / tie / loss of a against b (two `seed_summary` dicts): a difference of means beyond 2 standard errors
    counts; with a single seed on either side there is no standard error, so no verdict ("1 seed")."""
    if min(a["n"], b["n"]) < 2:
        return "1 seed"
    d = seed_difference(a, b)
    diff = d["diff"] if higher_is_better else -d["diff"]
    if abs(diff) <= max(2 * d["se"], 1e-9):
        return "tie"
    return "win" if diff > 0 else "loss"
