"""`prunebench leaderboard` across experiments and stores: a run found twice counts once, methods are ranked only
on the cells they all cover, different calibration sets are never pooled, and the page sorts from file://."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from prunebench.cli import main
from reports.board import markdown
from suite.testing import tiny_text_model

EVALUATION = {"ppl": ["embedded:test@128/32"], "tasks": ["pb_next_line"], "limit": 12}


def _run(root, workdir, name, methods, sparsities, **extra):
    cfg = {"name": name, "models": [str(root / "tiny")], "methods": [{"name": m} for m in methods],
           "sparsities": sparsities, "seeds": [0], "calibration": {"n": 8, "seq_len": 32, "valid_n": 2},
           "evaluation": EVALUATION} | extra
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--workdir", str(workdir)]) == 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    tiny_text_model(root / "tiny")
    _run(root, root / "w1", "a", ["random", "magnitude"], [0.3, 0.5])
    # b repeats a's random and magnitude runs at 0.5 (the same identities) and adds wanda_sp there only
    _run(root, root / "w2", "b", ["random", "magnitude", "wanda_sp"], [0.5])
    # c: the same grid on other calibration text (another seed): its own board
    _run(root, root / "w2", "c", ["random", "magnitude"], [0.3, 0.5],
         calibration={"n": 8, "seq_len": 32, "valid_n": 2, "seed": 1})
    shutil.copytree(root / "w1", root / "w1_copy")  # a whole store copied: every run found twice
    return root


def test_the_leaderboard_counts_duplicates_once_respects_coverage_and_keeps_calibrations_apart(stores, capsys):
    out = stores / "lb"
    args = ["leaderboard", "--experiment", "a", "--experiment", "b", "--experiment", "c",
            "--workdir", str(stores / "w1"), "--workdir", str(stores / "w2"), "--workdir", str(stores / "w1_copy")]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "leaderboard.json").read_text())
    # a's 4 runs again in the copy, and b's random and magnitude at 0.5 (same identity as a's): counted once
    assert summary["duplicates_counted_once"] == 4 + 2
    assert summary["runs"] == 4 + 1 + 4  # a, b's wanda_sp, c
    main_board, other = summary["boards"]
    assert main_board["experiments"] == ["a", "b"] and other["experiments"] == ["c"]
    assert other["differs_from_board_1"] == "calibration seed 0 -> 1"
    rank = pd.DataFrame(main_board["ranking"]).set_index("method")
    assert rank.loc["random", "cells"] == "2/2" and rank.loc["random", "runs"] == 2
    assert rank.loc["wanda_sp", "rank"] == "–" and rank.loc["wanda_sp", "cells"] == "1/2"
    assert pd.isna(rank.loc["wanda_sp", "retained_acc_%"])  # never averaged over the cells it missed
    cells = pd.DataFrame(main_board["cells"])
    at_half = cells[cells["sparsity"] == 0.5].set_index("method")
    assert set(at_half.index) == {"random", "magnitude", "wanda_sp"} and set(at_half["n"]) == {1}
    assert at_half["covers"].eq("items (n = 1 seed)").all()  # one seed: the items only, and it says so
    assert at_half["ppl [95%]"].str.contains(r"\[").all()  # perplexity with its interval
    coverage = pd.DataFrame(main_board["coverage"]).set_index("method")
    assert coverage.loc["wanda_sp"].tolist() == [0, 1]
    # the Markdown page is rendered from the JSON alone, and says what its numbers cover
    page_md = (out / "leaderboard.md").read_text()
    assert page_md == markdown(summary) and "95% rank interval" in page_md and "### paired tests" in page_md
    assert summary["built"]["code"] and main_board["best"] and main_board["pairs"]
    csv = pd.read_csv(out / "leaderboard.csv")
    assert set(csv["board"]) == {1, 2} and len(csv[csv["board"] == 2]) == 2
    page = (out / "index.html").read_text()
    assert "differs from board 1 in: calibration seed 0 -&gt; 1" in page and "http" not in page.split("<h1>")[0][-2000:]
    # building it again replaces the earlier leaderboard; a workdir is never a target
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(stores / "w2")]) == 2
    assert "refusing to replace a folder that holds a workdir" in capsys.readouterr().err
    assert main(["leaderboard", "--experiment", "nosuch", "--workdir", str(stores / "w1"), "--out",
                 str(stores / "lb2")]) == 2
    assert "no finished runs of experiment(s) nosuch" in capsys.readouterr().err


def test_the_leaderboard_page_sorts_by_a_header_click_in_headless_chromium(stores):
    from reports.render import chromium

    browser = chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (.ci/run installs Debian's chromium)")
    from playwright.sync_api import Locator, expect, sync_playwright

    out = stores / "lb_page"
    assert main(["leaderboard", "--experiment", "a", "--workdir", str(stores / "w1"), "--out", str(out)]) == 0
    with sync_playwright() as p:
        page = p.chromium.launch(executable_path=browser, args=["--no-sandbox"]).new_page()
        page.route("http*://**", lambda route: route.abort())  # offline: everything comes from the file
        page.goto((out / "index.html").as_uri())
        table = page.locator("table.dataTable").nth(1)  # every (model, sparsity) cell
        table.wait_for()

        headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]

        def cells(name: str) -> Locator:
            return table.locator(f"tbody tr td:nth-child({headers.index(name) + 1})")

        def click(name: str) -> None:
            table.locator("thead th").nth(headers.index(name)).click()

        before = cells("method").all_inner_texts()
        assert before != sorted(before)  # cell by cell: the clicks below must move rows
        click("method")
        expect(cells("method")).to_have_text(sorted(before))  # waits for the redraw, fails if it never comes
        click("method")
        expect(cells("method")).to_have_text(sorted(before, reverse=True))
        click("sparsity")
        expect(cells("sparsity")).to_have_text(["0.3", "0.3", "0.5", "0.5"])
