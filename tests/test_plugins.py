"""README's worked examples run as written: the plugin entry point and the tuning search-space syntax."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

README = (Path(__file__).parent.parent / "README.md").read_text()


def _block(lang: str, containing: str) -> str:
    (found,) = [b for b in re.findall(rf"```{lang}\n(.*?)```", README, re.S) if containing in b]
    return found


def test_the_readme_plugin_installs_through_its_entry_point(tmp_path):
    """The package and entry point exactly as README shows them, installed as a distribution on sys.path (what
    `pip install -e .` leaves), are found by every command."""
    site = tmp_path / "site"
    (site / "my_pruner").mkdir(parents=True)
    (site / "my_pruner" / "__init__.py").write_text(_block("python", "@register(\"row_norm\")"))
    groups = tomllib.loads(_block("toml", "prunebench.methods"))["project"]["entry-points"]
    info = site / "my_pruner-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-pruner\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items())
        for group, entries in groups.items()))
    env = os.environ | {"PYTHONPATH": str(site)}
    cli = [sys.executable, "-m", "prunebench.cli"]
    shown = subprocess.run([*cli, "methods", "row_norm", "--json"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["settings"]["power"]["default"] == 2.0
    from suite.testing import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    done = subprocess.run([*cli, "prune", "--model", str(tmp_path / "dense"), "--method", "row_norm", "--sparsity",
                           "0.3", "--set", "power=1", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "row_norm" and abs(metrics["sparsity"] - 0.3) < 0.05


def test_the_readme_search_space_is_valid():
    from suite.run.config import Experiment

    cfg = yaml.safe_load(_block("yaml", "search_space")) | {"name": "x", "models": ["zoo:tiny-llama"],
                                                             "sparsities": [0.5]}
    spaces = Experiment.model_validate(cfg).search_spaces()
    assert set(spaces["hc"]) == {"travel", "log_alpha_init", "test_mask"}
