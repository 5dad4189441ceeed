"""Every config under configs/ validates (offline), so documentation cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunebench.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_required_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "leaderboard-embedded"} <= names and any(n.startswith("paper") for n in names)


# what `validate` (run's own preflight) must say offline, in a fresh workdir, for configs that need more than this
# machine has: the hub, or a `prunebench tune` first
NEEDS = {"paper-qwen3-llama": "cannot reach the Hugging Face hub", "tune-ddp": "tuned: true but no tuning result",
         "tune-ddp-vs-hc": "tuned: true but no tuning result"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path, capsys, tmp_path):
    from suite.run.config import load_experiment

    load_experiment(str(path), [])  # the schema holds for every config
    code = main(["validate", str(path), "--workdir", str(tmp_path / "w")])
    out, err = capsys.readouterr()
    if path.stem in NEEDS:
        assert code == 2 and err.startswith("error: ") and NEEDS[path.stem] in err, err
    else:
        assert code == 0 and ": ok (" in out, err
    assert not (tmp_path / "w").exists()


def test_the_leaderboard_config_lists_every_registered_method():
    from suite.methods.pruner import methods
    from suite.run.config import load_experiment

    exp = load_experiment(str(next(p for p in CONFIGS if p.stem == "leaderboard-embedded")), [])
    assert {m.name for m in exp.methods} == set(methods())
