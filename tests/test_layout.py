"""README's layout promises: the worked examples of adding a method and a report view run as written, and the
import contracts hold (what `lint-imports` checks in the test command, checked here too so plain pytest sees it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

README = (Path(__file__).parent.parent / "README.md").read_text()


def _block(containing: str) -> str:
    (found,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if containing in b]
    return found


def test_the_how_to_add_a_method_example_registers_and_meets_the_contract():
    from suite.methods import get_method
    from suite.methods.pruner import METHODS
    from suite.model.masks import Target
    from suite.run.pipeline import prune_model
    from suite.testing import tiny_model

    exec(compile(_block('@register("first_units")'), "README", "exec"), {})
    try:
        cls = get_method("first_units")
        model = tiny_model("qwen3")
        outcome = prune_model(model, cls(), Target(sparsity=0.4))
        assert abs(outcome.metrics["sparsity"] - 0.4) < 0.05
        assert outcome.metrics["compact_vs_gated_max_abs_diff"] < 1e-4
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 8)))
    finally:
        METHODS._entries.pop("first_units")  # registered for this test only


def test_the_how_to_add_a_report_view_example_renders_and_is_registered_in_order():
    from reports.build import VIEWS, view

    namespace = {"view": view}
    exec(compile(_block('@view("kept_params")'), "README", "exec"), namespace)
    try:
        assert list(VIEWS)[-1] == "kept_params" and next(iter(VIEWS)) == "table"
        runs = pd.DataFrame({"kind": ["pruned", "pruned", "dense"], "method": ["a", "b", "dense"],
                             "sparsity": [0.5, 0.5, 0.0], "params_compact": [1000.0, 2000.0, None]})
        html = VIEWS["kept_params"](None, runs, "m", "m")
        assert "parameters kept" in html and "1,000" in html and "2,000" in html
    finally:
        VIEWS._entries.pop("kept_params")  # registered for this test only


# the interpreter's own environment first: its scripts are there even when it was started without activating it
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter not installed")
def test_imports_go_one_way():
    root = Path(__file__).parent.parent
    done = subprocess.run([LINT_IMPORTS], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    for contract in ("suite never imports reports", "A model knows nothing of methods",
                     "Methods and recovery know nothing of orchestration", "No import cycles"):
        assert f"{contract}" in done.stdout
