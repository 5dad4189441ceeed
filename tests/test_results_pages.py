"""A results page is generated from its data: the committed page's table is what its committed JSON renders, so
the two cannot disagree (change the data, regenerate the page: `python -m reports.comparison`)."""

from __future__ import annotations

import json
from pathlib import Path

from reports.comparison import READING_MARKER, cells, render

ROOT = Path(__file__).resolve().parent.parent


def test_the_ddp_vs_hc_page_is_what_its_data_renders():
    data = json.loads((ROOT / "benchmarks" / "ddp_vs_hc.json").read_text())
    page = (ROOT / "docs" / "results-ddp-vs-hc.md").read_text()
    assert READING_MARKER in page
    assert page.split(READING_MARKER, 1)[0] == render(data)
    table = cells(data)
    assert {c["variant"] for c in table} == {"ddp", "hard_concrete", "ddp[budget-safe]"}
    assert all(c["seeds"] == 3 for c in table)  # three seeds in every cell, each with its own calibration draw
    for c in table:  # the page's interval is the seed t-interval of the rows it summarises
        rows = [r for r in data["rows"] if all(r[k] == c[k] for k in ("model", "sparsity", "steps", "calibration_n",
                                                                        "variant"))]
        assert len({r["calibration_hash"] for r in rows}) == 3
        assert abs(c["ppl"] - sum(r["ppl"] for r in rows) / 3) < 1e-9


def test_a_changed_number_changes_the_page():
    data = json.loads((ROOT / "benchmarks" / "ddp_vs_hc.json").read_text())
    before = render(data)
    data["rows"][0]["ppl"] += 1.0
    assert render(data) != before
