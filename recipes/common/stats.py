"""Summaries over seeds both recipes report: mean ± sample std, and the mean of paired differences with its
t-interval."""

from __future__ import annotations

import math
import statistics

from scipy import stats


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "n"}`` of ``values`` over seeds (sample std; 0 for a single value)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def mean_and_interval(diffs: list[float], level: float = 0.95) -> tuple[float, list[float] | None]:
    """Mean of ``diffs`` and its two-sided ``level`` t-interval (None for a single difference)."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]
