"""Golden outputs: what every registered method produces on every family's tiny config, and one small sweep's
results table, recorded before a refactor and compared after it. A change of layout or of shared machinery must
leave these bytes and numbers as they were; a change that means to move them regenerates the file on purpose:

    PRUNEBENCH_WRITE_GOLDEN=1 pytest tests/test_golden.py

and the diff of `tests/golden.json` shows, in review, exactly which outputs moved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from prunebench.cli import main
from suite.methods.pruner import get_method, methods
from suite.model.masks import Target
from suite.run.pipeline import prune_model
from suite.testing import FAMILY_NAMES, quick_config, tiny_calibration, tiny_model, tiny_text_model

GOLDEN = Path(__file__).with_name("golden.json")
WRITE = os.environ.get("PRUNEBENCH_WRITE_GOLDEN") == "1"
# the float noise of the compact-vs-gated probe is not an output of the method, and timings (`*seconds`) vary
VOLATILE = {"compact_vs_gated_max_abs_diff"}
REL = 1e-5  # numbers: equal up to float summation order
SWEEP_METHODS = [{"name": "random"}, {"name": "magnitude"}, {"name": "flap"},
                 {"name": "gisp", "params": {"iterations": 3, "nested": [0.15]}},
                 {"name": "ddp", "params": {"steps": 4, "batch_size": 2, "valid_batches": 1}}]


@pytest.fixture(autouse=True)
def one_thread():
    """Float reductions (so a mask learner's trajectory) depend on the thread count: the golden file is made on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def _record(key: str, value) -> None:
    golden = _golden()
    golden[key] = value
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in VOLATILE
            and not k.endswith("seconds")}


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=REL, abs_tol=1e-9)


@pytest.mark.parametrize("method", sorted(methods()))
def test_every_method_on_every_family_is_unchanged(method, tmp_path):
    cls = get_method(method)
    got = {}
    for family in FAMILY_NAMES:
        model = tiny_model(family)
        calibration = tiny_calibration(n=16, seed=0) if cls.needs_calibration else None
        outcome = prune_model(model, cls(quick_config(cls)), Target(sparsity=0.5), seed=0,
                              granularity="kv_group", calibration=calibration)
        outcome.result.save(tmp_path / family)
        ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        got[family] = {"masks_sha256": hashlib.sha256((tmp_path / family / "masks.safetensors").read_bytes())
                       .hexdigest(), "metrics": _numbers(outcome.metrics) | {"probe_nll": loss}}
    key = f"method/{method}"
    if WRITE:
        _record(key, got)
        return
    want = _golden()[key]
    assert set(got) == set(want)
    for family, g in got.items():
        w = want[family]
        assert g["masks_sha256"] == w["masks_sha256"], f"{method} on {family}: masks changed"
        assert set(g["metrics"]) == set(w["metrics"]), f"{method} on {family}: metric keys changed"
        moved = {k: (g["metrics"][k], w["metrics"][k]) for k in w["metrics"]
                 if not _close(g["metrics"][k], w["metrics"][k])}
        assert not moved, f"{method} on {family}: numbers changed (got, golden): {moved}"


def test_a_small_sweep_table_is_unchanged(tmp_path, capsys):
    model_dir = tiny_text_model(tmp_path / "tiny")
    cfg = {"name": "golden", "models": [str(model_dir)], "methods": SWEEP_METHODS, "sparsities": [0.3],
           "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
           "evaluation": {"ppl": ["embedded:test@128/32"], "tasks": ["pb_next_line"], "limit": 12}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "exp.yaml"), "--workdir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    # the printed table minus its timing column (prune_s, the last one)
    lines = [line for line in out.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "method"])
    rows = [line.split()[1:-1] for line in lines[start:]]  # the model column is a temporary path
    if WRITE:
        _record("sweep", rows)
        return
    assert rows == _golden()["sweep"]
