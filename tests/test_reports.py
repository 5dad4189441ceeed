"""Reports: built from the tracking store alone; tables, heatmaps, plots, leaderboard, protocol guard, rendering."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from prunebench.cli import main
from reports import heatmaps, leaderboard, tables
from reports.build import build_report, slug
from reports.query import load_results
from suite.errors import ConfigError
from suite.run.tracking import Tracker
from suite.stats import holm
from suite.testing import tiny_text_model

# the frozen-gate ddp row is a departure from DDP's defaults, and its label says so
DDP = "ddp[lambda_lr=0.0001,lr=0.0001]"


def _experiment(root, model, name, ppl="embedded:test@128/32", **extra):
    cfg = {"name": name, "models": [str(model)],
           "methods": [{"name": "random"},
                       # forced to miss its budget: gates that cannot move leave every unit to the projection
                       {"name": "ddp", "params": {"steps": 5, "batch_size": 2, "valid_batches": 1, "lr": 1e-4,
                                                  "lambda_lr": 1e-4}}],
           "sparsities": [0.3, 0.5], "seeds": [0, 1], "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
           "evaluation": {"ppl": [ppl], "tasks": ["pb_next_line", "pb_return"], "limit": 12}} | extra
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--workdir", str(root / "runs")]) == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    model = tiny_text_model(root / "tiny")
    _experiment(root, model, "unit")
    _experiment(root, model, "other", ppl="embedded:test@64/32", methods=[{"name": "random"}], sparsities=[0.5],
                seeds=[0])
    return root


@pytest.fixture(scope="module")
def report(store):
    out = store / "report"
    assert main(["report", "--experiment", "unit", "--workdir", str(store / "runs"), "--out", str(out)]) == 0
    return out


def test_query_is_one_tidy_row_per_finished_run(store):
    df = load_results(store / "runs", ["unit"])
    assert (df["kind"] == "pruned").sum() == 8 and (df["kind"] == "dense").sum() == 1
    pruned = df[df["kind"] == "pruned"]
    assert sorted(pruned["sparsity"].unique()) == [0.3, 0.5]  # the target, not what was achieved
    assert (pruned["achieved_sparsity"] - pruned["sparsity"]).abs().max() < 0.1
    assert {"ppl.embedded_test_128/32", "acc.pb_next_line", "mean_acc", "retained.mean_acc"} <= set(df.columns)


def test_report_has_every_part(report, store):
    index = (report / "index.html").read_text()
    for rel in re.findall(r'(?:src|href)="([^"]+)"', index):
        assert (report / rel).is_file(), rel
    model = next(p.stem for p in (report / "tables").glob("*.md") if p.stem not in ("leaderboard", "summary"))
    md = (report / "tables" / f"{model}.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 1 + 2 * 2  # header, rule, dense, 2 methods x 2 sparsities
    assert "**" in md and "±" in md  # best in bold, 95% CI over the two seeds
    csv = pd.read_csv(report / "tables" / f"{model}.csv")
    df = load_results(store / "runs", ["unit"])
    ddp = df[(df["method"] == DDP) & (df["sparsity"] == 0.5)]
    row = csv[(csv["method"] == DDP) & (csv["sparsity"] == 0.5)].iloc[0]
    assert row["mean_acc"] == pytest.approx(ddp["mean_acc"].mean())
    assert row["mean_acc.n"] == 2
    for stem in ("pareto", "cost", "curves"):
        assert (report / "figures" / f"{model}_{stem}.png").is_file()
        assert (report / "figures" / f"{model}_{stem}.pdf").is_file()
    heat = report / "heatmaps" / model
    for method in ("random", DDP):
        assert (heat / f"{slug(method)}_sp0.5_seed1.png").is_file()
    assert (heat / "profiles_sp0.3_seed0.png").is_file() and (heat / "jaccard_sp0.3_seed0.png").is_file()
    assert {"mean_acc.low", "mean_acc.high", "seeds"} <= set(csv.columns) and set(csv["seeds"]) == {1, 2}
    ppl = next(c for c in csv.columns if c.startswith("ppl.") and c.count(".") == 1)
    assert (csv[f"{ppl}.low"] < csv[ppl]).all() and (csv[ppl] < csv[f"{ppl}.high"]).all()  # the dense row too
    board = pd.read_csv(report / "tables" / "leaderboard.csv")
    # two seeds of 12 items per cell: 95% rank intervals, each within 1–2
    assert sorted(board["method"]) == [DDP, "random"] and set(board["rank"]) <= {"1", "2", "1–2"}
    assert list(board["cells"]) == ["2/2", "2/2"] and list(board["runs"]) == [4, 4]
    summary = pd.read_csv(report / "tables" / "summary.csv")
    # the tiny random model is at chance: where every pruned model's perplexity is above its vocabulary size, the
    # summary names none
    assert list(summary["sparsity"]) == [0.3, 0.5]
    for _, row in summary.iterrows():
        assert (row["best"], row["n"]) == ("none: every model broken", 0) or row["n"] == 2
    index = (report / "index.html").read_text()
    assert index.index("summary: best method") < index.index("<h2>leaderboard")
    assert 'class="protocol"' in index and "the first 12 items of each" in index and "NaN" not in index
    assert set(pd.read_csv(report / "tables" / "significance.csv").columns) == {"a", "b", "cells", "seeds",
                                                                              "mean_diff_acc", "p", "p_holm"}
    assert (report / "tables" / "tests_acc.csv").is_file() and "95% rank interval" in index
    assert len(list((report / "tables").glob("tests_ppl*.csv"))) == 1  # a perplexity spec holds a "/": one file
    assert json.loads((report / "report.json").read_text())["seconds"] < 60


def _tabular_rows(tex):
    assert tex.startswith(r"\begin{tabular}{") and tex.rstrip().endswith(r"\end{tabular}")
    spec = re.match(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    assert tex.count(r"\toprule") == 1 and tex.count(r"\bottomrule") == 1 and r"\midrule" in tex
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    for line in rows:
        assert len(re.split(r"(?<!\\)&", line)) == len(spec), line
        assert not re.search(r"(?<!\\)[_%#]", line), line  # specials escaped
        assert line.count("{") == line.count("}"), line
    return rows


def test_a_run_that_missed_its_budget_is_marked_in_the_table_and_the_leaderboard(report, store):
    df = load_results(store / "runs", ["unit"])
    ddp = df[df["method"] == DDP]
    assert (ddp["diag_relaxed_sparsity"] == 0.0).all() and (ddp["diag_projection_share"] > 0.9).all()
    name = next(p.stem for p in (report / "tables").glob("*.md") if p.stem not in ("leaderboard", "summary"))
    table = (report / "tables" / f"{name}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ddp")]
    # † missed; ✗ as well where the random tiny model's perplexity is above its vocabulary size
    assert len(rows) == 2 and all(re.match(rf"\| {re.escape(DDP)} †✗? \|", r) for r in rows)
    assert not any(line.startswith("| random †") for line in table.splitlines())
    assert tables.MISS_NOTE in table and "relaxed sp." in table
    board = (report / "tables" / "leaderboard.md").read_text()
    assert tables.MISS_NOTE in board
    rank = pd.read_csv(report / "tables" / "leaderboard.csv").set_index("method")
    assert rank.loc[DDP, "missed_budget"] == 4 and rank.loc["random", "missed_budget"] == 0
    missed = pd.read_csv(report / "tables" / "missed_budget.csv")
    assert set(missed["method"]) == {DDP} and len(missed) == 4
    assert "runs whose relaxation missed its budget" in (report / "index.html").read_text()
    assert r"\dag{}" in (report / "tables" / f"{name}.tex").read_text()


def test_latex_tables_are_valid_booktabs_tabulars(report):
    texs = list((report / "tables").glob("*.tex"))
    assert len(texs) == 2
    for tex in texs:
        assert _tabular_rows(tex.read_text())


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_report_reads_the_store_and_writes_nothing_into_it(store, tmp_path):
    before = _snapshot(store / "runs")
    assert main(["report", "--experiment", "unit", "--workdir", str(store / "runs"), "--out", str(tmp_path / "r")]) == 0
    assert _snapshot(store / "runs") == before
    # re-running the same command replaces its own earlier output, with no flag
    (tmp_path / "r" / "index.html").write_text("stale")
    assert main(["report", "--experiment", "unit", "--workdir", str(store / "runs"), "--out", str(tmp_path / "r")]) == 0
    assert "prunebench report" in (tmp_path / "r" / "index.html").read_text()


@pytest.mark.parametrize("where", ["workdir", "parent of the workdir", "user folder", "other output"])
def test_report_out_never_replaces_what_prunebench_did_not_write(store, tmp_path, where, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    prune_out = tmp_path / "pruned"
    prune_out.mkdir()
    (prune_out / ".prunebench-output").write_text('{"kind": "prune"}')
    out = {"workdir": store / "runs", "parent of the workdir": store, "user folder": user,
           "other output": prune_out}[where]
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["report", "--experiment", "unit", "--workdir", str(store / "runs"), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}"), err
    assert _snapshot(out) == before


def test_a_copied_workdir_reports_identically_and_leaves_the_original_alone(store, report, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store / "runs", copy)
    original = _snapshot(store / "runs")
    hidden = store / "runs_away"
    (store / "runs").rename(hidden)  # the copy must not need the original's files
    try:
        assert main(["report", "--experiment", "unit", "--workdir", str(copy), "--out", str(tmp_path / "r"),
                     "--log-to-store"]) == 0
    finally:
        hidden.rename(store / "runs")
    assert _snapshot(store / "runs") == original
    names = ["results.csv", *(p.relative_to(report).as_posix() for p in (report / "tables").glob("*.[cm][sd]*"))]
    assert len(names) > 5
    for name in names:
        assert (tmp_path / "r" / name).read_text() == (report / name).read_text(), name
    assert sorted(p.name for p in (tmp_path / "r" / "heatmaps").rglob("*.png")) == \
        sorted(p.name for p in (report / "heatmaps").rglob("*.png"))
    # --log-to-store wrote the report into the copy's own artifact folder
    t = Tracker(copy, "unit", create=False)
    logged = t.artifact_dir(t.client.get_run(t.parent()).info.artifact_uri)
    assert logged.is_relative_to(copy) and (logged / "report" / "index.html").is_file()


def test_report_from_a_tracking_uri_outside_the_workdir(store, report, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(store / "runs", tmp_path / "elsewhere")
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    assert main(["report", "--experiment", "unit", "--tracking-uri", uri, "--workdir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r1")]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["report", "--experiment", "unit", "--workdir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r2")]) == 0
    assert not (tmp_path / "none").exists()
    for out in ("r1", "r2"):
        assert (tmp_path / out / "results.csv").read_text() == (report / "results.csv").read_text()


def test_mixed_protocols_are_refused_with_the_difference_named(store, capsys):
    both = r"embedded:test@128/32.*embedded:test@64/32|embedded:test@64/32.*embedded:test@128/32"
    with pytest.raises(ConfigError, match=both):
        build_report(store / "runs", ["unit", "other"], store / "mixed")
    assert main(["report", "--experiment", "unit", "--experiment", "other", "--workdir", str(store / "runs"),
                 "--out", str(store / "mixed")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing to merge") and "\n" not in err
    index = build_report(store / "runs", ["unit", "other"], store / "mixed", allow_mixed=True)
    assert "MIXED PROTOCOLS" in index.read_text()
    assert (store / "mixed" / "tables" / "protocol1_leaderboard.csv").is_file()


def test_unknown_experiment_is_one_line(store, capsys):
    assert main(["report", "--experiment", "nope", "--workdir", str(store / "runs"), "--out", str(store / "x")]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_report_renders_in_headless_chromium(report):
    from reports.render import chromium, images_drawn, ink, screenshot

    if chromium() is None:
        pytest.skip("headless Chromium not installed (.ci/run installs Debian's chromium)")
    png = screenshot(report / "index.html", report / "index.png")
    assert ink(png) > 0.02  # not blank
    assert images_drawn(png)  # the figures loaded


# -- the statistics, on hand-made data ---------------------------------------------------------------------------


def _frame(acc_a, acc_b):
    rows = []
    for seed, (a, b) in enumerate(zip(acc_a, acc_b, strict=True)):
        for method, acc in (("a", a), ("b", b)):
            rows.append({"model": "m", "sparsity": 0.5, "seed": seed, "method": method, "mean_acc": acc})
    return pd.DataFrame(rows)


def test_win_rate_counts_shared_cells():
    df = _frame([0.70, 0.72, 0.71, 0.69, 0.73, 0.70], [0.60, 0.61, 0.62, 0.60, 0.59, 0.61])
    win = leaderboard.win_rate(df, ["a", "b"])
    assert win.loc["a", "b"] == 1.0 and win.loc["b", "a"] == 0.0


def test_p_values_and_the_matrix_show_holm_corrected_p_only():
    assert leaderboard.p_text(0.0312) == "0.031" and leaderboard.p_text(float("nan")) == "–"
    assert leaderboard.p_text(0.00012) == "0.00012"
    sig = pd.DataFrame([{"a": "x", "b": "y", "mean_diff_acc": 0.021, "p_holm": 0.012}])
    grid = leaderboard.matrix(sig, ["x", "y"])
    assert grid.loc["x", "y"] == "+2.1 (p 0.012)*" and grid.loc["y", "x"] == "-2.1 (p 0.012)*"
    assert grid.loc["x", "x"] == "–"


def test_holm_matches_the_step_down_procedure_it_adjusts_for():
    """The adjusted p-values agree with Holm's procedure run from its definition: at every alpha, a hypothesis has
    adjusted p <= alpha exactly when the step-down test (p_(k) against alpha / (m - k + 1), stopping at the first
    failure) rejects it; untested pairs (NaN) stay NaN and are not counted in m."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 12))
        if trial % 3 == 0:
            p[rng.integers(len(p))] = np.nan
        if trial % 4 == 0 and len(p) > 2:
            p[1] = p[0]  # ties
        adjusted = holm(p)
        assert np.array_equal(np.isnan(adjusted), np.isnan(p))
        tested = [i for i in range(len(p)) if not np.isnan(p[i])]
        m = len(tested)
        for alpha in (0.01, 0.05, 0.1, 0.5):
            rejected = set()
            for k, i in enumerate(sorted(tested, key=lambda i: p[i]), start=1):
                if p[i] > alpha / (m - k + 1):
                    break
                rejected.add(i)
            # a tie at the threshold may go either way in the step-down order; compare away from it
            assert {i for i in tested if adjusted[i] <= alpha} == rejected or any(
                abs(p[i] * (m - k) - alpha) < 1e-12 for i in tested for k in range(m))
    assert holm(np.array([0.01, 0.04, 0.03])).tolist() == pytest.approx([0.03, 0.06, 0.06])


def test_ci95_is_the_t_interval():
    values = pd.Series([1.0, 2.0, 3.0])
    assert tables.ci95(values) == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert np.isnan(tables.ci95(pd.Series([1.0])))


def test_jaccard_and_parameter_weighted_layer_profile():
    a = {"L00.attn": np.array([1, 0, 0, 1]), "L00.mlp": np.array([1, 1, 0, 0])}
    b = {"L00.attn": np.array([1, 0, 1, 1]), "L00.mlp": np.array([1, 0, 0, 0])}
    names, m = heatmaps.jaccard({"a": a, "b": b})
    assert names == ["a", "b"]
    # removed: a = attn{1,2} mlp{2,3}; b = attn{1} mlp{1,2,3} -> shared 3 of 5
    assert m[0, 1] == pytest.approx(3 / 5) and m[0, 0] == 1.0
    meta = {"group_params": {"L00.attn": 400, "L00.mlp": 100}, "group_removed": {"L00.attn": 200, "L00.mlp": 50}}
    assert heatmaps.layer_sparsity(a, meta) == {0: pytest.approx(250 / 500)}


def test_one_label_with_two_configurations_is_two_rows_and_a_non_finite_metric_is_flagged(tmp_path):
    """The review's case: one method run with `selection=global`, then `per_layer`, one seed: two methods named by
    what differs (the departure from the default names itself), never one cell averaged over both. A point recorded
    twice counts once. An infinite perplexity is shown as inf (MLflow alone would clamp it to its largest float) and
    its row is marked ‡."""
    model = tiny_text_model(tmp_path / "tiny")
    cfg = {"name": "mix", "models": [str(model)], "methods": [{"name": "magnitude", "params": {"selection": "global"}}],
           "sparsities": [0.3], "calibration": {"n": 4, "seq_len": 32, "valid_n": 0},
           "evaluation": {"ppl": ["embedded:test@64/4"], "tasks": ["pb_next_line"], "limit": 4}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir)]) == 0
    assert main(["run", str(path), "--workdir", str(workdir), "--set", "methods.0.params.selection=per_layer"]) == 0
    df = load_results(workdir, ["mix"])
    pruned = df[df["kind"] == "pruned"]
    assert sorted(pruned["method"]) == ["magnitude", "magnitude[selection=global]"]
    assert list(pruned["hp.selection"].sort_values()) == ["global", "per_layer"]

    t = Tracker(workdir, "mix")
    run = next(r for r in t.client.search_runs([t.experiment_id]) if r.data.params.get("hp.selection") == "global")
    twin = t.client.create_run(t.experiment_id, tags=run.data.tags)  # the same point recorded a second time
    t.log(twin.info.run_id, params=run.data.params, metrics=dict(run.data.metrics) | {"ppl.embedded_test_64/4":
                                                                                       float("inf")})
    t.finish(twin.info.run_id)
    df = load_results(workdir, ["mix"])
    pruned = df[df["kind"] == "pruned"]
    assert len(pruned) == 2  # counted once: the later record
    flagged = pruned[pruned["method"] == "magnitude[selection=global]"].iloc[0]
    assert flagged["ppl.embedded_test_64/4"] == float("inf") and flagged["nonfinite"] == "ppl.embedded_test_64/4"
    table = tables.markdown(tables.summarize(df, str(model)))
    assert "magnitude[selection=global] ‡✗" in table and "| inf" in table and tables.NONFINITE_NOTE in table


def test_calibration_words_read_the_draw_rule_as_mlflow_returns_it():
    """MLflow gives params back as text: 'False' is each seed its own draw, never one draw because it is non-empty."""
    from reports.build import calibration_words

    base = {"source": "embedded", "split": "train", "n": 64, "seq_len": 128, "valid_n": 8, "seed": 0}
    assert "each run seed s its own draw" in calibration_words(json.dumps(base | {"fixed_draw": "False"}))
    assert "one draw for every run seed" in calibration_words(json.dumps(base | {"fixed_draw": "True"}))
    assert "one draw for every run seed" in calibration_words(json.dumps(base))  # recorded before the setting
