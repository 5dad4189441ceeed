"""The interval and paired test of suite.stats, checked by simulation on item-level data with a known truth.

Each simulated comparison is a table of item scores for two methods: every seed of both methods is scored on the
same items (item difficulty shared), a pruned model of a seed shifts its accuracy (a seed main effect) and gets its
own items right or wrong (a seed x item interaction). Under the null the two methods draw from one distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from suite.stats import crossed, holm

SIMULATIONS = 4000  # Monte-Carlo sd of a 5% rate: 0.34 points; the bands below are 3 sd
ITEMS = 100


def _mc_band(rate: float, n: int = SIMULATIONS) -> float:
    return 3 * np.sqrt(rate * (1 - rate) / n)


def _bernoulli_pair(rng: np.random.Generator, seeds: int, seed_sd: float, item_sd: float = 0.6,
                    own_sd: float = 0.0, effect: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two methods' 0/1 item scores, [SIMULATIONS, seeds, ITEMS] each, on shared items (difficulty on the logit
    scale), with a seed main effect `seed_sd`, a seed x item interaction `item_sd`, and items a method gets right or
    wrong at every seed (`own_sd`: equal on average, not item by item) per method."""
    difficulty = rng.normal(0.4, 1.3, size=(SIMULATIONS, 1, ITEMS))

    def method(shift: float) -> np.ndarray:
        main = rng.normal(0, seed_sd, size=(SIMULATIONS, seeds, 1))
        main = main + rng.normal(0, own_sd, size=(SIMULATIONS, 1, ITEMS))
        inter = rng.normal(0, item_sd, size=(SIMULATIONS, seeds, ITEMS))
        p = 1 / (1 + np.exp(-(difficulty + shift + main + inter)))
        return (rng.random(p.shape) < p).astype(float)

    return method(effect), method(0.0)


@pytest.mark.parametrize(("seeds", "seed_sd", "own_sd"),
                         [(1, 0.0, 0.0), (1, 0.0, 0.5), (3, 0.4, 0.0), (5, 0.4, 0.0), (3, 1.0, 0.0), (3, 0.4, 0.5),
                          (5, 0.4, 0.5)])
def test_paired_test_holds_its_level_under_the_null(seeds: int, seed_sd: float, own_sd: float) -> None:
    """Two identical methods: the paired test rejects 5% of the time, within Monte-Carlo error, at 1, 3 and 5 seeds
    (with one seed, the null it tests is that the two pruned models score alike on the items' population: a seed
    main effect cannot be told from a method's with one seed, and the tables say n = 1 seed)."""
    rng = np.random.default_rng(seeds * 100 + int(seed_sd * 10) + int(own_sd * 10))
    a, b = _bernoulli_pair(rng, seeds, seed_sd, own_sd=own_sd)
    rate = float((crossed([a - b]).p < 0.05).mean())
    assert abs(rate - 0.05) <= _mc_band(0.05), rate


@pytest.mark.parametrize("seeds", [3, 5])
def test_paired_test_is_conservative_without_seed_noise(seeds: int) -> None:
    """Where seeds change nothing on average (no seed main effect), the test errs on the safe side: at most 5%."""
    a, b = _bernoulli_pair(np.random.default_rng(seeds), seeds, 0.0)
    assert float((crossed([a - b]).p < 0.05).mean()) <= 0.05 + _mc_band(0.05)


def test_paired_test_over_several_tasks_holds_its_level() -> None:
    """Three tasks of different sizes, weighted equally (a run's mean accuracy), with the seed rows shared."""
    rng = np.random.default_rng(7)
    diffs = []
    for _size in (60, 100, 150):
        a, b = _bernoulli_pair(rng, 3, 0.4)
        diffs.append((a - b)[..., : _size if _size <= ITEMS else ITEMS])
    rate = float((crossed(diffs).p < 0.05).mean())
    assert abs(rate - 0.05) <= _mc_band(0.05), rate


def test_one_seed_cannot_see_a_seed_main_effect() -> None:
    """Why single-seed comparisons are labelled conditional: with a seed main effect, the item-only test at one seed
    rejects far more than 5% of identical methods; at 3 seeds the same data hold the level."""
    rng = np.random.default_rng(11)
    a, b = _bernoulli_pair(rng, 1, 0.4)
    assert float((crossed([a - b]).p < 0.05).mean()) > 0.15


@pytest.mark.parametrize("seeds", [3, 5])
def test_power_is_what_the_test_claims(seeds: int) -> None:
    """A known effect on Gaussian item scores with known variance components: the rejection rate matches the power
    of the t-test at Satterthwaite's degrees of freedom computed from the true components."""
    rng = np.random.default_rng(100 + seeds)
    effect, item_sd, seed_sd, noise_sd = 0.25, 0.5, 0.1, 0.5
    shape = (SIMULATIONS, seeds, ITEMS)

    def method(shift: float) -> np.ndarray:
        item = rng.normal(0, item_sd, size=(SIMULATIONS, 1, ITEMS))  # the method's own item effects
        seed = rng.normal(0, seed_sd, size=(SIMULATIONS, seeds, 1))
        return shift + item + seed + rng.normal(0, noise_sd, size=shape)

    rate = float((crossed([method(effect) - method(0.0)]).p < 0.05).mean())
    # the difference's expected mean squares over S x n: seeds' spread of the per-seed mean, items, residual
    per_seed = 2 * seed_sd**2 + 2 * noise_sd**2 / ITEMS
    ms_item, ms_res = 2 * (seeds * item_sd**2 + noise_sd**2), 2 * noise_sd**2
    terms = [(per_seed / seeds, seeds - 1), (ms_item / (seeds * ITEMS), ITEMS - 1),
             (-ms_res / (seeds * ITEMS), (seeds - 1) * (ITEMS - 1))]
    variance = sum(t for t, _ in terms)
    df = variance**2 / sum(t**2 / d for t, d in terms)
    crit = stats.t.ppf(0.975, df)
    ncp = effect / np.sqrt(variance)
    claimed = float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))
    assert 0.3 < claimed < 0.9  # a power worth checking
    assert abs(rate - claimed) <= _mc_band(claimed) + 0.02, (rate, claimed)


def test_a_deterministic_method_keeps_its_item_interval() -> None:
    """Three seeds that give the same scores are as uncertain as one (the same items again add nothing): the
    interval at 3 seeds is the one-seed item interval, never zero; a seed that varies widens it."""
    rng = np.random.default_rng(3)
    one = (rng.random((1, ITEMS)) < 0.8).astype(float)
    single, repeated = crossed([one]), crossed([np.repeat(one, 3, axis=0)])
    assert float(single.half) > 0
    assert abs(float(repeated.half) / float(single.half) - 1) < 0.10
    varied = np.concatenate([one, (rng.random((2, ITEMS)) < 0.6).astype(float)])
    assert float(crossed([varied]).half) > float(single.half)


def test_one_seed_interval_is_the_item_standard_error() -> None:
    """With one seed the interval is the items' t-interval: lm-eval's stderr sqrt(p(1-p)/(n-1)) for 0/1 scores."""
    x = np.array([[1.0] * 80 + [0.0] * 20])
    est = crossed([x])
    assert float(est.se) == pytest.approx(np.sqrt(0.8 * 0.2 / 99))
    assert float(est.half) == pytest.approx(stats.t.ppf(0.975, 99) * np.sqrt(0.8 * 0.2 / 99))


def test_holm_matches_statsmodels_values() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan, 0.5, 0.2, 0.04])
    expected = [0.06, 0.16, 0.15, 0.035, np.nan, 0.5, 0.4, 0.16]
    np.testing.assert_allclose(holm(p), expected)
