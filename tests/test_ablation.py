"""Ablation studies: params grids expand to labelled variants with their own identities, a bad value is refused
before anything is written, and the swept knobs become hp.* columns of every table."""

from __future__ import annotations

import pytest

from prunebench.cli import main
from suite.run.config import load_experiment
from suite.run.grid import expand
from suite.testing import tiny_experiment, tiny_text_model

GRID = {"name": "ddp", "params": {"steps": 4, "batch_size": 2, "valid_batches": 1,
                                  "forward_map": {"grid": ["relu", "identity", "clamp"]},
                                  "mu_end": {"grid": [20, 100]}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("m") / "tiny")


def _config(tmp_path, model_dir, methods, **extra):
    return tiny_experiment(tmp_path, model_dir, **{"name": "ablation", "methods": methods, "seeds": [0, 1]} | extra)


def test_a_grid_expands_to_labelled_variants_with_their_own_identities(tmp_path, model_dir, capsys):
    path = _config(tmp_path, model_dir, [{"name": "random"}, GRID])
    exp = load_experiment(path)
    labels = [m.key for m in exp.methods]
    assert labels == ["random", *(f"ddp[forward_map={f},mu_end={m}]" for f in ("relu", "identity", "clamp")
                                  for m in (20, 100))]
    variant = exp.methods[3]
    assert variant.sweep == {"forward_map": "identity", "mu_end": 20}
    assert variant.params == {"steps": 4, "batch_size": 2, "valid_batches": 1, "forward_map": "identity",
                              "mu_end": 20}
    specs = expand(exp, tmp_path)
    assert len(specs) == 7 * 2  # (1 + 3 x 2 variants) x 2 seeds
    assert len({s.identity("fp") for s in specs}) == len(specs)
    assert {s.hyperparameters["mu_end"] for s in specs if s.method == "ddp"} == {20.0, 100.0}
    assert main(["validate", str(path), "--workdir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "= 14 runs" in out and "params grids: 6 variants" in out
    assert "ddp[forward_map=clamp,mu_end=100]: forward_map=clamp, mu_end=100" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("methods.0.params.mu_end.grid.1=-5", "methods.0.params.mu_end.grid.1: -5 is refused by ddp: Input should be "
                                          "greater than 0"),
    ("methods.0.params.forward_map.grid=[relu,tanh]", "methods.0.params.forward_map.grid.1: 'tanh' is refused"),
    ("methods.0.params.mu_end.grid=[]", "methods.0.params.mu_end.grid: expected a non-empty list"),
    ("methods.0.params.mu_end.grid=[20,20]", "methods.0.params.mu_end.grid: repeated values"),
    ("methods.0.params.steps=0", "methods.0.params.steps: Input should be greater than or equal to 1"),
])
def test_a_bad_grid_value_is_refused_with_its_key_path_before_any_store_write(tmp_path, model_dir, capsys,
                                                                             override, message):
    path = _config(tmp_path, model_dir, [GRID])
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not workdir.exists()


def test_knobs_valid_one_by_one_that_clash_together_are_refused_as_that_variant(tmp_path, model_dir, capsys):
    tyr = {"name": "tyr", "params": {"stage_tokens": {"grid": [[512, 2048], [256, 512, 2048]]},
                                     "stage_keep": {"grid": [[2, 1], [4, 2, 1]]}}}
    path = _config(tmp_path, model_dir, [tyr])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: methods.0.params: the variant tyr[stage_keep=[2,1],stage_tokens=[256,512,2048]] is "
                   "refused by tyr: stage_tokens and stage_keep need one entry per selection stage")


def test_swept_knobs_are_hp_columns_and_the_report_shows_each_knob_and_their_interaction(tmp_path, model_dir,
                                                                                          capsys):
    import pandas as pd

    methods = [{"name": "random"}, {"name": "ddp", "params": {
        "steps": 3, "batch_size": 2, "valid_batches": 1, "forward_map": {"grid": ["relu", "clamp"]},
        "mu_end": {"grid": [20, 100]}}}]
    path = _config(tmp_path, model_dir, methods)
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()[-11:]
    assert header.split()[:4] == ["model", "method", "hp.forward_map", "hp.mu_end"]
    assert rows[0].split()[1:4] == ["random", "-", "-"]
    assert rows[-1].split()[1:4] == ["ddp[forward_map=clamp,mu_end=100]", "clamp", "100"]
    reports = {}
    for mode in ("marginal", "held"):
        out = tmp_path / f"r_{mode}"
        assert main(["report", "--experiment", "ablation", "--workdir", str(workdir), "--out", str(out),
                     "--ablation", mode]) == 0
        reports[mode] = out
    results = pd.read_csv(reports["held"] / "results.csv")
    pruned = results[results["kind"] == "pruned"]
    variant = pruned[pruned["method"] == "ddp[forward_map=clamp,mu_end=20]"]
    assert len(variant) == 2 and set(variant["hp.forward_map"]) == {"clamp"} and set(variant["hp.mu_end"]) == {20}
    assert set(variant["sweep"]) == {'{"forward_map": "clamp", "mu_end": 20}'}
    assert pruned.loc[pruned["method"] == "random", "sweep"].isna().all()  # not swept
    # marginal: each knob value pools the other knob's 2 values x 2 seeds; held: 2 seeds per cell
    marginal = pd.read_csv(next(reports["marginal"].glob("tables/*_ablation_ddp_forward_map.csv")))
    assert list(marginal["knob.forward_map"]) == ["relu", "clamp"] and set(marginal["mean_acc.n"]) == {4}
    assert "knob.mu_end" not in marginal
    held = pd.read_csv(next(reports["held"].glob("tables/*_ablation_ddp_mu_end.csv")))
    assert len(held) == 4 and set(held["mean_acc.n"]) == {2} and list(held["knob.mu_end"]) == [20, 100, 20, 100]
    runs = pruned[pruned["method"].str.startswith("ddp[")]
    per_value = runs.groupby("hp.mu_end")["mean_acc"].mean()
    assert marginal["mean_acc"].notna().all()
    mu = pd.read_csv(next(reports["marginal"].glob("tables/*_ablation_ddp_mu_end.csv"))).set_index("knob.mu_end")
    assert abs(mu.loc[20, "mean_acc"] - per_value[20]) < 1e-12
    # three DDP steps never reach a 0.3 target: every cell says its runs missed the budget
    assert set(mu["missed_budget"]) == {4}
    page = (reports["marginal"] / "index.html").read_text()
    assert "ablation: ddp over forward_map, mu_end" in page and "forward_map x mu_end" in page
    assert " †" in page and len(list(reports["marginal"].glob("figures/*_ablation_ddp_*.png"))) == 2
