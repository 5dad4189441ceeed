"""Tuning trials as Ray tasks (`tuning.executor: ray`) on a local Ray cluster bound to 127.0.0.1, against a shared
Optuna storage on a private PostgreSQL server: every requested trial completes, none runs twice, and the trial of a
worker killed mid-run is failed by its silent heartbeat and retried with the same parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from suite.testing import tiny_text_model

pytest.importorskip("ray")


def _kill_a_running_trial(storage: str, study_name: str, tune: subprocess.Popen, timeout: float = 900) -> int:
    """SIGKILL the Ray worker process running the first trial seen RUNNING (its `worker` attribute names it);
    the trial's number."""
    import optuna

    storage = optuna.storages.RDBStorage(storage)  # one connection pool for the whole watch
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and tune.poll() is None:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:  # not created yet
            time.sleep(0.2)
            continue
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if "worker" in t.user_attrs:
                os.kill(int(t.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
                return t.number
        time.sleep(0.1)
    raise AssertionError(f"no trial was seen running (tune exited {tune.poll()}: "
                         f"{tune.stderr.read()[-2000:] if tune.poll() is not None else ''})")


def test_ray_trials_complete_once_each_and_a_killed_workers_trial_is_retried(postgres, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    n = 4
    model = tiny_text_model(tmp_path / "tiny")
    cfg = {"name": "raytune", "models": [str(model)],
           # long enough per trial (a few seconds) for the test to kill one mid-run; no intermediate reports, so the
           # MedianPruner stops none and every trial that is not killed completes
           "methods": [{"name": "ddp", "params": {"steps": 200, "batch_size": 2, "valid_batches": 1}}],
           "sparsities": [0.3], "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
           "evaluation": {"ppl": ["embedded:test@128/8"], "tasks": ["pb_next_line"], "limit": 4},
           "tracking": {"uri": f"{postgres}/mlflow"}, "executor": {"num_cpus": 1},
           "tuning": {"n_trials": n, "report_every": 1000, "storage": f"{postgres}/optuna", "executor": "ray",
                      "heartbeat_s": 2}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tune = subprocess.Popen([sys.executable, "-m", "prunebench.cli", "tune", str(path), "--workdir",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": os.getcwd()})
    study_name = f"raytune/ddp/{model}"
    try:
        killed = _kill_a_running_trial(f"{postgres}/optuna", study_name, tune)
        out, err = tune.communicate(timeout=900)
    finally:
        tune.kill()
    assert tune.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name=study_name, storage=f"{postgres}/optuna").trials
    states = {t.number: t.state.name for t in trials}
    assert states[killed] == "FAIL"  # failed by the heartbeat, not by an error of its own
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == next(t for t in trials if t.number == killed).params
    assert sorted(states.values()) == ["COMPLETE"] * n + ["FAIL"]  # n requested, n complete

    # none ran twice: one MLflow run per trial number, the killed one marked KILLED
    client = MlflowClient(tracking_uri=f"{postgres}/mlflow")
    runs = client.search_runs([client.get_experiment_by_name("raytune").experiment_id],
                              "tags.`prunebench.kind` = 'trial'")
    numbers = [int(r.data.params["trial"]) for r in runs]
    assert sorted(numbers) == sorted(states) and len(set(numbers)) == len(numbers)
    assert {r.data.params["trial"]: r.info.status for r in runs}[str(killed)] == "KILLED"
    workers = {t.user_attrs["worker"] for t in trials if t.state.name == "COMPLETE"}
    assert all(w.split(":")[1] != str(tune.pid) for w in workers)  # trials ran in Ray workers, not the driver
    assert f"{n + 1} trials this run; 1 retried after their worker died" in out
