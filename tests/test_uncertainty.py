"""Intervals, paired tests, rank intervals, best-per-cell and broken models in the reports, on hand-made runs whose
stored item scores are known (each run a folder with the evaluation JSON the runner writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import leaderboard, tables
from reports import uncertainty as u
from suite.stats import crossed

TASKS = {"t1": 100, "t2": 60}
WINDOWS = 40


def _evaluation(acc: dict[str, np.ndarray], nll: np.ndarray, vocab: int = 1000) -> dict:
    tasks = {t: {"acc": float(v.mean()), "acc_norm": float(v.mean()), "n": len(v),
                 "items": {"doc_id": list(range(len(v))), "acc": v.tolist()}} for t, v in acc.items()}
    ppl = {"ppl": float(np.exp(nll.mean())), "nll": float(nll.mean()), "tokens": 63 * len(nll),
           "windows": {"nll": (63 * nll).tolist(), "tokens": [63] * len(nll)}}
    return {"tasks": tasks, "ppl": {"embedded:test@64": ppl}, "mean_acc": float(np.mean([v.mean() for v in
                                                                                      acc.values()])),
            "vocab_size": vocab}


def _row(folder: Path, kind: str, method: str, sparsity: float, seed: int, result: dict) -> dict:
    folder.mkdir(parents=True)
    if kind == "dense":
        (folder / "evaluation.json").write_text(json.dumps(result))
    else:
        (folder / "metrics.json").write_text(json.dumps({"evaluation": result}))
    return {"model": "m", "kind": kind, "method": method, "sparsity": sparsity, "seed": seed,
            "artifacts": str(folder), "mean_acc": result["mean_acc"],
            "ppl.embedded_test_64": result["ppl"]["embedded:test@64"]["ppl"],  # its MLflow key
            **{f"acc.{t}": r["acc"] for t, r in result["tasks"].items()}}


def _runs(tmp_path: Path, methods: dict[str, list[tuple[dict[str, np.ndarray], np.ndarray]]],
          dense: tuple[dict[str, np.ndarray], np.ndarray], sparsity: float = 0.5, vocab: int = 1000) -> pd.DataFrame:
    """A frame like `reports.query.load_results` gives: a dense reference and each method's seeds."""
    rows = [_row(tmp_path / "dense", "dense", "dense", 0.0, -1, _evaluation(*dense))]
    for method, seeds in methods.items():
        for seed, (acc, nll) in enumerate(seeds):
            rows.append(_row(tmp_path / f"{method}-{sparsity}-{seed}", "pruned", method, sparsity, seed,
                             _evaluation(acc, nll, vocab)))
    df = pd.DataFrame(rows)
    dense_acc = df.loc[df["kind"] == "dense", "mean_acc"].iloc[0]
    df["retained.mean_acc"] = 100 * df["mean_acc"] / dense_acc
    return df


def _scores(rng: np.random.Generator, p: float, nll: float = 3.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return ({t: (rng.random(n) < p).astype(float) for t, n in TASKS.items()},
            nll + 0.3 * rng.standard_normal(WINDOWS))


def test_a_deterministic_method_at_three_seeds_keeps_its_one_seed_interval(tmp_path):
    """The review's case: the same scores at 3 seeds used to get ± 0.00 from a t-interval over seeds."""
    rng = np.random.default_rng(0)
    once = _scores(rng, 0.7)
    df = _runs(tmp_path, {"det": [once] * 3, "one": [once]}, _scores(rng, 0.8))
    scores = leaderboard.cell_scores(df).set_index("method")
    assert scores.loc["det", "ci95"] > 1.0
    assert scores.loc["det", "ci95"] == pytest.approx(scores.loc["one", "ci95"], rel=0.10)
    assert scores.loc["det", "ci_from"] == "seeds × items" and scores.loc["one", "ci_from"] == "items (n = 1 seed)"
    assert scores.loc["det", "ppl_low"] < scores.loc["det", "ppl"] < scores.loc["det", "ppl_high"]
    # the model table: a perplexity interval and the seeds each row rests on
    table = tables.markdown(tables.summarize(df, "m"))
    assert "1 (items only)" in table and "| 3 |" in table and " [" in table and tables.INTERVAL_NOTE in table


def test_retained_interval_matches_the_crossed_estimator_by_hand(tmp_path):
    rng = np.random.default_rng(1)
    runs = [_scores(rng, 0.6) for _ in range(3)]
    dense = _scores(rng, 0.8)
    df = _runs(tmp_path, {"a": runs}, dense)
    got = leaderboard.cell_scores(df).iloc[0]
    base = np.mean([dense[0][t].mean() for t in TASKS])
    ratio = np.mean([np.mean([r[0][t].mean() for r in runs]) for t in TASKS]) / base
    strata = [(np.stack([r[0][t] for r in runs]) - ratio * dense[0][t]) * 100 / base for t in TASKS]
    assert got["retained_acc_%"] == pytest.approx(100 * ratio)
    assert got["ci95"] == pytest.approx(float(crossed(strata).half))


def test_ranks_tests_and_best_say_only_what_the_data_support(tmp_path):
    rng = np.random.default_rng(2)
    methods = {"strong": [_scores(rng, 0.9, 2.0) for _ in range(3)],
               "mid1": [_scores(rng, 0.55, 3.0) for _ in range(3)],
               "mid2": [_scores(rng, 0.55, 3.0) for _ in range(3)]}
    df = _runs(tmp_path, methods, _scores(rng, 0.95, 1.5))
    rank = leaderboard.ranking(df).set_index("method")
    assert rank.loc["strong", "rank"] == "1" and rank.loc["mid1", "rank"] == rank.loc["mid2", "rank"] == "2–3"
    cells = leaderboard.cell_scores(df).set_index("method")
    assert cells.loc["strong", "ppl_rank"] == "1"
    tests = leaderboard.cell_significance(df, u.ACC).set_index(["a", "b"])
    assert tests.loc[("mid1", "strong"), "p_holm"] < 0.01 and tests.loc[("mid1", "mid2"), "p_holm"] > 0.05
    assert (tests["p_holm"] >= tests["p"]).all()
    nll = leaderboard.cell_significance(df, "ppl.embedded_test_64").set_index(["a", "b"])
    assert nll.loc[("mid1", "strong"), "effect"] == pytest.approx(1.0, abs=0.2)
    best = leaderboard.best_per_cell(df).iloc[0]
    assert best["best"] == "strong" and best[leaderboard.TIED] == "–"
    tied = leaderboard.best_per_cell(df[df["method"] != "strong"]).iloc[0]
    assert tied["best"] == "no separation" and set(tied[leaderboard.TIED].split(", ")) == {"mid1", "mid2"}
    shown = leaderboard.significance_display(leaderboard.significance(df, ["strong", "mid1", "mid2"]))
    assert list(shown.columns) == ["a", "b", "cells", "seeds", "effect (acc points, a - b)", "p, Holm-corrected"]


def test_a_broken_model_is_marked_and_never_named_best(tmp_path):
    """The real-model review's case: magnitude called best at 50% with a perplexity in the millions."""
    rng = np.random.default_rng(3)
    methods = {"wreck": [_scores(rng, 0.6, np.log(5.6e6))], "fine": [_scores(rng, 0.5, 3.0)]}
    df = _runs(tmp_path, methods, _scores(rng, 0.8), vocab=49152)
    assert u.broken(df).tolist() == [False, True, False]
    best = leaderboard.best_per_cell(df).iloc[0]
    assert best["best"] in ("fine", "no separation") and "wreck" not in best["best"]
    assert leaderboard.ranking(df).set_index("method").loc["wreck", "broken"] == 1
    table = tables.markdown(tables.summarize(df, "m"))
    assert "| wreck ✗ |" in table and u.BROKEN_NOTE in table


def test_runs_without_item_scores_get_no_interval(tmp_path):
    """A run recorded before item scores were stored: its mean, and no interval from another unit."""
    rng = np.random.default_rng(4)
    df = _runs(tmp_path, {"old": [_scores(rng, 0.6)] * 2}, _scores(rng, 0.8))
    for folder in df.loc[df["kind"] == "pruned", "artifacts"]:
        (Path(folder) / "metrics.json").write_text(json.dumps({"evaluation": {}}))
    u._evaluation.cache_clear()
    scores = leaderboard.cell_scores(df).iloc[0]
    assert scores["retained_acc_%"] == pytest.approx(df.loc[1, "retained.mean_acc"])
    assert np.isnan(scores["ci95"]) and scores["ci_from"] == "–"


def test_only_shared_cells_are_ranked(tmp_path):
    """c ran on one model of two: listed unranked with its coverage, never averaged over the cell it missed."""
    rng = np.random.default_rng(5)
    frames = []
    accuracy = {"a": 0.8, "b": 0.6, "c": 0.9}
    for model, methods in (("m1", ("a", "b", "c")), ("m2", ("a", "b"))):
        df = _runs(tmp_path / model, {m: [_scores(rng, accuracy[m])] for m in methods}, _scores(rng, 0.9))
        frames.append(df.assign(model=model))
    rank = leaderboard.ranking(pd.concat(frames, ignore_index=True)).set_index("method")
    assert list(rank.index) == ["a", "b", "c"] and rank.loc["c", "rank"] == "–" and rank.loc["c", "cells"] == "1/2"
    assert np.isnan(rank.loc["c", "retained_acc_%"]) and rank.loc["a", "rank"] == "1"


def test_a_dense_reference_without_item_scores_gives_retained_no_interval(tmp_path):
    """A store resumed with this version: the dense run recorded before item scores, the pruned runs after. Retained %
    is the runs' own number without an interval (never the raw accuracy passed off as retained)."""
    rng = np.random.default_rng(6)
    df = _runs(tmp_path, {"new": [_scores(rng, 0.6)]}, _scores(rng, 0.8))
    (tmp_path / "dense" / "evaluation.json").write_text(json.dumps({"tasks": {}}))
    u._evaluation.cache_clear()
    scores = leaderboard.cell_scores(df).iloc[0]
    assert scores["retained_acc_%"] == pytest.approx(df.loc[1, "retained.mean_acc"])
    assert np.isnan(scores["ci95"]) and scores["ci_from"] == "–"
    table = tables.summarize(df, "m").frame
    assert np.isnan(table.loc[("new", 0.5), ("retained.mean_acc", "low")])
    assert table.loc[("new", 0.5), ("mean_acc", "low")] < table.loc[("new", 0.5), ("mean_acc", "mean")]
