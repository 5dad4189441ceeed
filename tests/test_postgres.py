"""Issue "Reliability": the cluster setup — MLflow tracking and Optuna tuning on a PostgreSQL server that several
workers share — against a private server on 127.0.0.1 (Debian's postgresql; skipped where it is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from prunebench.cli import main
from suite.testing import tiny_text_model
from tests.test_runner import SIX_POINTS, repeats_answered_from_their_twin

pytest.importorskip("psycopg2")


def test_a_sweep_and_two_tuning_workers_share_one_postgresql_server(postgres, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    model = tiny_text_model(tmp_path / "tiny")
    cfg = {"name": "pg", "models": [str(model)],
           "methods": [{"name": "random"}, {"name": "ddp", "params": {"steps": 6, "batch_size": 2,
                                                                     "valid_batches": 1}}],
           "sparsities": [0.3], "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
           "evaluation": {"ppl": ["embedded:test@128/8"], "tasks": ["pb_next_line"], "limit": 4},
           "tracking": {"uri": f"{postgres}/mlflow"},
           "tuning": {"n_trials": 6, "report_every": 100, "storage": f"{postgres}/optuna",
                      "search_space": {"ddp": SIX_POINTS}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir)]) == 0
    client = MlflowClient(tracking_uri=f"{postgres}/mlflow")
    runs = client.search_runs([client.get_experiment_by_name("pg").experiment_id])
    assert sorted(r.data.tags.get("prunebench.kind", "parent") for r in runs) == ["dense", "parent", "pruned", "pruned"]
    assert not (workdir / "mlflow.db").exists()  # everything went to the server

    # the report reads the server through --tracking-uri, and through MLFLOW_TRACKING_URI, from anywhere
    for how, env in (("flag", {}), ("env", {"MLFLOW_TRACKING_URI": f"{postgres}/mlflow"})):
        flag = ["--tracking-uri", f"{postgres}/mlflow"] if how == "flag" else []
        cmd = [sys.executable, "-m", "prunebench.cli", "report", "--experiment", "pg", "--workdir",
               str(tmp_path / "none"), *flag, "--out", str(tmp_path / f"report_{how}")]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        results = (tmp_path / f"report_{how}" / "results.csv").read_text()
        assert results.count("\n") == 1 + 3  # header, dense, two pruned
    assert not (tmp_path / "none").exists()  # a reader writes nothing into the workdir

    # two tuning workers at once on the shared study; processes of their own (a fork would share this process's
    # pooled server connections)
    cmd = [sys.executable, "-m", "prunebench.cli", "tune", str(path), "--workdir", str(workdir)]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outs]
    (study,) = optuna.get_all_study_summaries(f"{postgres}/optuna")
    assert study.n_trials == 12
    trials = optuna.load_study(study_name=study.study_name, storage=f"{postgres}/optuna").trials
    assert len({t.user_attrs["sampler_seed"] for t in trials}) == 2  # each worker sampled with its own seed
    # the review's F6: 12 trials over 6 configurations from two workers at once, none pruned twice
    assert len(repeats_answered_from_their_twin(trials)) <= 6
    assert not (workdir / "optuna.db").exists()


def test_a_killed_tuning_worker_s_trial_is_failed_and_retried_and_claims_use_the_database(postgres, tmp_path):
    """Optuna's heartbeat: a tuning worker SIGKILLed mid-trial leaves the trial RUNNING; the next worker fails it as
    stale (by the server's clock), marks its MLflow run KILLED and runs its parameters again, so the requested trials
    all complete. The sweep's claims live in the tracking database (the `prunebench_claims` table)."""
    import signal
    import time

    import optuna
    import sqlalchemy as sa
    from mlflow.tracking import MlflowClient

    model = tiny_text_model(tmp_path / "tiny")
    cfg = {"name": "pgkill", "models": [str(model)],
           "methods": [{"name": "ddp", "params": {"steps": 400, "batch_size": 2, "valid_batches": 1}}],
           "sparsities": [0.3], "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
           "evaluation": {"ppl": ["embedded:test@128/8"], "tasks": [], "limit": 4},
           "tracking": {"uri": f"{postgres}/mlflow"},
           "tuning": {"n_trials": 1, "report_every": 50, "storage": f"{postgres}/optuna", "heartbeat_s": 1,
                      "search_space": {"ddp": {"mu_end": {"type": "float", "low": 10, "high": 500, "log": True}}}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "prunebench.cli", "tune", str(path), "--workdir", str(tmp_path / "runs")]
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    client = MlflowClient(tracking_uri=f"{postgres}/mlflow")
    running, recording = [], []
    while not (running and recording):  # wait until the victim is inside its trial, its MLflow run started
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[1][-2000:]
        time.sleep(0.5)
        summaries = optuna.get_all_study_summaries(f"{postgres}/optuna")
        names = [s.study_name for s in summaries if s.study_name.startswith("pgkill/")]
        if names:
            study = optuna.load_study(study_name=names[0], storage=f"{postgres}/optuna")
            running = [t for t in study.trials if t.state.name == "RUNNING"]
        experiment = client.get_experiment_by_name("pgkill")
        if experiment is not None:
            recording = client.search_runs([experiment.experiment_id], "tags.`prunebench.kind` = 'trial' and "
                                           "attributes.status = 'RUNNING'")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    time.sleep(4)  # past the grace period (three heartbeats)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = optuna.load_study(study_name=names[0], storage=f"{postgres}/optuna").trials
    killed = trials[running[0].number]
    assert killed.state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == killed.params
    runs = client.search_runs([client.get_experiment_by_name("pgkill").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_runs = [r for r in runs if r.data.tags.get("prunebench.identity", "").endswith(f":{killed.number}")]
    assert [r.info.status for r in trial_runs] == ["KILLED"]

    # a sweep on this store claims its grid points in the database, and releases them all
    assert main(["run", str(path), "--workdir", str(tmp_path / "runs")]) == 0
    engine = sa.create_engine(f"{postgres}/mlflow")
    with engine.connect() as con:
        assert con.execute(sa.text("select count(*) from prunebench_claims")).scalar() == 0
    engine.dispose()
    assert not (tmp_path / "runs" / "claims").exists()
