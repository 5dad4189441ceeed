"""Statistics shared by reports and benches: the interval of a mean over seeds *and* evaluation items, and the paired
test of two methods on the same items and seeds.

Every seed of every method is scored on the same evaluation items (a task's documents, a perplexity's windows), so
seeds and items are *crossed*, not nested: a score is item effect + seed effect + their interaction. The variance of
the grand mean of an S x n table of such scores is

    Var = s2_seed / S + s2_item / n + s2_residual / (S n),

estimated as var(per-seed statistic) / S (the seed component plus each seed's residual) + max(0, MS_item -
MS_residual) / (S n) (the items' component, where the ANOVA puts it above zero), and read against a t distribution
with Satterthwaite's degrees of freedom. With no item component it is the t-test over seeds; with one seed, the
item t-interval. Two consequences a table relies on:

- a method whose seeds all give the same scores (a deterministic method) keeps exactly its one-seed item interval:
  the same items again add no information, and its interval is never zero;
- with one seed, the seed variance cannot be estimated: the interval and the test cover the items only, conditional
  on that seed's pruned model, and say so ("n = 1 seed").

Several strata (a run's tasks) combine as a weighted mean, each with its own items and the seed rows shared (the
same pruned model answers every task). Shapes carry a leading batch axis so a simulation runs a thousand tables at
once. `tests/test_stats.py` checks the test's type-I error and power by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05


def ci95(values: Iterable[float]) -> float:
    """Half-width of the 95% t-interval of the mean; NaN for fewer than two finite values. For quantities measured
    once per run (prune time, achieved sparsity, speed), whose unit of replication is the run."""
    from scipy import stats

    v = [float(x) for x in values if x == x]
    if len(v) < 2:
        return math.nan
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))


@dataclass(frozen=True)
class Estimate:
    """A weighted mean over seeds and items, its standard error and degrees of freedom (arrays under a batch)."""

    mean: np.ndarray
    se: np.ndarray
    df: np.ndarray

    @property
    def half(self) -> np.ndarray:
        """Half-width of the 95% interval."""
        from scipy import stats

        return stats.t.ppf(1 - ALPHA / 2, self.df) * self.se

    @property
    def p(self) -> np.ndarray:
        """Two-sided p-value of mean = 0 (for a table of paired differences: of no difference)."""
        from scipy import stats

        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.abs(self.mean) / self.se
        p = 2 * stats.t.sf(t, self.df)
        return np.where(self.se > 0, p, np.where(self.mean == 0, 1.0, 0.0))


def crossed(strata: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> Estimate:
    """The mean of `strata` (each [..., S, n_t]: rows the seeds, shared by every stratum, columns its items) weighted
    by `weights` (default equal), with the crossed-design standard error (module docstring)."""
    if not strata:
        raise ValueError("no strata")
    k = len(strata)
    w = np.full(k, 1 / k) if weights is None else np.asarray(weights, dtype=float)
    seeds = strata[0].shape[-2]
    if any(x.shape[-2] != seeds for x in strata):
        raise ValueError("every stratum needs the same seed rows")
    mean = sum(wt * x.mean(axis=(-2, -1)) for wt, x in zip(w, strata, strict=True))
    terms: list[tuple[np.ndarray, float]] = []  # (coefficient x mean square, its degrees of freedom)
    if seeds > 1:  # the seeds' spread of the whole statistic: seed effect + what each seed's items add
        per_seed = sum(wt * x.mean(axis=-1) for wt, x in zip(w, strata, strict=True))
        terms.append((per_seed.var(axis=-1, ddof=1) / seeds, seeds - 1))
    for wt, x in zip(w, strata, strict=True):
        n = x.shape[-1]
        if n < 2:
            continue
        item = wt**2 * x.mean(axis=-2).var(axis=-1, ddof=1) / n  # MS_item / (S n)
        if seeds == 1:
            terms.append((item, n - 1))
            continue
        # the items' variance component, (MS_item - MS_residual) / S, where it is positive (a variance is not
        # negative; where it estimates below zero the items add nothing the seeds' spread has not counted)
        resid = x - x.mean(axis=-1, keepdims=True) - x.mean(axis=-2, keepdims=True) \
            + x.mean(axis=(-2, -1), keepdims=True)
        dof = (seeds - 1) * (n - 1)
        residual = wt**2 * (resid**2).sum(axis=(-2, -1)) / dof / (seeds * n)
        kept = item > residual
        terms += [(np.where(kept, item, 0.0), n - 1), (np.where(kept, -residual, 0.0), dof)]
    if not terms:
        nan = np.full(np.shape(mean), np.nan)
        return Estimate(np.asarray(mean), nan, nan)
    variance = np.maximum(sum(t for t, _ in terms), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = variance**2 / sum(t**2 / d for t, d in terms)
    df = np.where(np.isfinite(df), np.maximum(df, 1.0), 1.0)
    return Estimate(np.asarray(mean), np.sqrt(variance), df)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN: not tested, left out of the family): the k-th
    smallest of m is multiplied by m - k + 1, made monotone from the smallest up, and capped at 1."""
    out = np.full(len(p), np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def percentile_interval(draws: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 2.5% and 97.5% points of bootstrap draws (for ranks: lower="lower", the ranks that actually occurred)."""
    return (np.quantile(draws, ALPHA / 2, axis=axis, method="lower"),
            np.quantile(draws, 1 - ALPHA / 2, axis=axis, method="higher"))
