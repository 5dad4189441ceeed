"""A results page is generated from its data: the committed page's table is what its committed JSON renders, so
the two cannot disagree (change the data, regenerate the page: `python -m reports.comparison`)."""

from __future__ import annotations

import json
from pathlib import Path

from reports.board import markdown
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


def test_the_quickstart_leaderboard_page_is_what_its_data_renders():
    """docs/results-quickstart-leaderboard.md: the quickstart with its tiny-llama 50% cell re-run at three seeds. The
    page is the leaderboard JSON rendered; its cells say what their intervals cover (one seed: the items only)."""
    data = json.loads((ROOT / "benchmarks" / "quickstart_leaderboard.json").read_text())
    page = (ROOT / "docs" / "results-quickstart-leaderboard.md").read_text()
    assert page == markdown(data)
    (board,) = data["boards"]
    three = [c for c in board["cells"] if c["n"] == 3]
    assert {c["model"] for c in three} == {"zoo:tiny-llama"} and {c["sparsity"] for c in three} == {0.5}
    assert all(c["covers"] == "seeds × items" for c in three) and len(three) == 11
    assert all(c["covers"] == "items (n = 1 seed)" for c in board["cells"] if c["n"] == 1)
    assert all(c["rank (95%)"] != "–" for c in board["cells"]) and board["pairs"]
    assert "95% rank interval" in page and "Holm" in page
