"""The mean of paired differences and its t-interval, as both recipes report them."""

from __future__ import annotations

import math

from scipy import stats


def mean_and_interval(diffs: list[float], level: float = 0.95) -> tuple[float, list[float] | None]:
    """Mean of ``diffs`` and its two-sided ``level`` t-interval (None for a single difference)."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]
