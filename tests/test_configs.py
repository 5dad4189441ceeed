"""Every config under configs/ validates (offline), so documentation cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from suite.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_required_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "leaderboard-embedded"} <= names and any(n.startswith("paper") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert ": ok (" in capsys.readouterr().out


def test_the_leaderboard_config_lists_every_registered_method():
    from suite.config import load_experiment
    from suite.pruner import methods

    exp = load_experiment(str(next(p for p in CONFIGS if p.stem == "leaderboard-embedded")), [])
    assert {m.name for m in exp.methods} == set(methods())
