"""Small statistics shared by reports and benches."""

from __future__ import annotations

import math
from collections.abc import Iterable


def ci95(values: Iterable[float]) -> float:
    """Half-width of the 95% t-interval of the mean; NaN for fewer than two finite values."""
    from scipy import stats

    v = [float(x) for x in values if x == x]
    if len(v) < 2:
        return math.nan
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))
