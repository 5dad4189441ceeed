"""`prunebench leaderboard`: one leaderboard from any number of experiments in any number of stores.

What makes it sound, where merging results naively would not be:

- one board per evaluation protocol and calibration set (and, ranking the recovered stage, recovery stage): numbers
  measured under different protocols, from different calibration data or after different recoveries are never
  ranked together, and each board says how it differs from the first;
- it ranks one stage and says which: the pruned models (w/o tune, the default) or the recovered ones (w/ tune);
- a run found twice (the same identity: the same model, method, hyperparameters, target, seed, data, protocol and
  code, recorded by two experiments or copied into two stores) counts once;
- methods are ranked only on the (model, sparsity) cells they all cover; coverage is shown, never averaged over;
- every cell has its number of seeds, a 95% interval over seeds and evaluation items (with one seed: items only,
  and it says so) and a 95% rank interval from a joint bootstrap of seeds and items; comparisons are paired on the
  same seeds and items and Holm-corrected; a best method is named only where it is significantly better than the
  runner-up, and broken models (perplexity above the vocabulary size) are marked and never named best.

Output: a static, self-contained index.html (DataTables embedded by itables, so it sorts and filters from file://
with no server or network), leaderboard.json and leaderboard.csv (rankings) and cells.csv for a website.
"""

from __future__ import annotations

import html
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reports import leaderboard
from reports.build import (
    BEST_NOTE,
    BOARD_NOTE,
    CELLS_NOTE,
    MATRIX_NOTE,
    STAGE_WORDS,
    STYLE,
    board_display,
    calibration_words,
    cells_display,
    marked,
    measure_words,
    protocol_difference,
    protocol_words,
    recovery_words,
    stage_note,
)
from reports.query import LOCAL, STAGES, export, load_results, stage_view
from reports.tables import frame_markdown
from suite.errors import ConfigError
from suite.outputs import check_dir, output_dir
from suite.run.record import flatten
from suite.run.tracking import git_commit


@dataclass(frozen=True)
class Store:
    """A tracking store to read: a workdir's own, or a URI (with a workdir for its local artifacts)."""

    workdir: Path
    uri: str | None = None

    @property
    def name(self) -> str:
        return self.uri or str(self.workdir)


def gather(stores: list[Store], experiments: list[str], stage: str = "pruned") -> tuple[pd.DataFrame, int]:
    """Every finished run of `experiments` in any of `stores`, at `stage`, a run found more than once kept once (the
    latest record; the dense references too); returns the runs and how many pruned runs were found more than once
    (at the pruned stage, runs that differ only in their recovery stage count as one: `stage_view`). An experiment in
    none of the stores is refused."""
    frames, found = [], set()
    for store in stores:
        for name in experiments:
            try:
                df = load_results(store.workdir, [name], store.uri)
            except ConfigError:
                continue  # not in this store
            if len(df):
                frames.append(df.assign(store=store.name))
                found.add(name)
    missing = [n for n in experiments if n not in found]
    if missing:
        raise ConfigError(f"no finished runs of experiment(s) {', '.join(missing)} in "
                          f"{', '.join(s.name for s in stores)}")
    found_runs = pd.concat(frames, ignore_index=True).sort_values("start_time", kind="stable")
    df = stage_view(found_runs, stage)
    keyed = df["identity"].astype(bool)
    unique = pd.concat([df[keyed].drop_duplicates("identity", keep="last"), df[~keyed]])
    before = found_runs if stage == "pruned" else df  # the recovered stage leaves runs without one out: not twice
    dropped = int((before["kind"] == "pruned").sum() - (unique["kind"] == "pruned").sum())
    unique = unique.sort_values(["model", "kind", "method", "sparsity", "seed"], ignore_index=True)
    return unique.copy(), dropped  # one block per dtype: the boards add columns to slices of it


@dataclass
class Board:
    """The runs of one protocol, one calibration specification (source, splits, n, length, draw rule: the seeds of
    one experiment, each with its own draw, share it) and (ranking the recovered stage) one recovery stage, with
    the dense references of that protocol."""

    protocol: str
    calibration: str  # the specification as JSON; every run also records its own sample's hash
    runs: pd.DataFrame
    recovery: str = ""

    @property
    def pruned(self) -> pd.DataFrame:
        return self.runs[self.runs["kind"] == "pruned"]


def boards(df: pd.DataFrame, stage: str = "pruned") -> list[Board]:
    """One board per (protocol, calibration specification), and at the recovered stage per recovery stage too;
    largest first."""
    pruned, dense = df[df["kind"] == "pruned"], df[df["kind"] == "dense"]
    keys = ["protocol", "calibration"] + (["recovery"] if stage == "recovered" else [])
    out = [Board(key[0], key[1], pd.concat([dense[dense["protocol"] == key[0]], runs]), *key[2:])
           for key, runs in pruned.groupby(keys, sort=True)]
    return sorted(out, key=lambda b: -len(b.pruned))


def difference(board: Board, first: Board) -> str:
    """How a board differs from the first one, in words."""
    parts = []
    if board.protocol != first.protocol:
        parts.append("protocol " + protocol_difference(board.runs.iloc[0], first.runs.iloc[0]).split(": ", 1)[-1])
    if board.calibration != first.calibration:
        mine, theirs = (json.loads(b.calibration or "{}") for b in (board, first))
        parts.append("calibration " + ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in
                                                sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)))
    if board.recovery != first.recovery:
        mine, theirs = (flatten("", json.loads(b.recovery or "{}")) for b in (board, first))
        parts.append("recovery " + ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}"
                                             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)))
    return "; ".join(parts)


def interactive(df: pd.DataFrame, caption: str) -> str:
    """A sortable, filterable table (DataTables through itables, offline: the page loads it once)."""
    from itables import to_html_datatable

    return to_html_datatable(df, caption=caption, connected=False, display_logo_when_loading=False,
                             text_in_header_can_be_selected=False, column_filters="footer", paging=False,
                             layout={"topStart": None, "topEnd": "search", "bottomStart": None, "bottomEnd": None},
                             classes="display compact", showIndex=False, allow_html=False,
                             style="table-layout:auto;width:auto;margin:0")


def build_leaderboard(stores: list[Store], experiments: list[str], out: Path, stage: str = "pruned") -> Path:
    """Write the leaderboard of `stage` ("pruned": w/o tune, "recovered": w/ tune) under `out` (all or nothing) and
    return its index.html."""
    from itables import options
    from itables.javascript import generate_init_offline_itables_html

    start = time.perf_counter()
    check_dir(out, "leaderboard")
    df, duplicates = gather(stores, experiments, stage)
    found = boards(df, stage)
    if not found:
        raise ConfigError(f"no pruned runs in experiment(s) {', '.join(experiments)}")
    sections, records, rankings, cell_rows = [], [], [], []
    for i, board in enumerate(found, start=1):
        rank = leaderboard.ranking(board.runs)
        scores = leaderboard.cell_scores(board.runs)
        cells = cells_display(scores, mark=False)
        order = [m for m in rank["method"] if m in set(rank.loc[rank["rank"] != "–", "method"])]
        sig = leaderboard.significance(board.runs, order)
        grid = leaderboard.matrix(sig, order) if len(order) > 1 else None
        best = leaderboard.best_per_cell(board.runs)
        tests = leaderboard.cell_significance_by_measure(board.runs)
        cover = leaderboard.coverage(board.pruned)
        differs = difference(board, found[0]) if i > 1 else ""
        title = f"board {i}: protocol {board.protocol}, calibration {calibration_words(board.calibration)}"
        sections += [f"<h2>{html.escape(title)}</h2>",
                     f'<p class="warn">differs from board 1 in: {html.escape(differs)}</p>' if differs else "",
                     protocol_words(board.runs),
                     f"<p>{len(board.pruned)} runs from {html.escape(', '.join(records_of(board)))}. "
                     f"{html.escape(stage_note(stage))} {html.escape(BOARD_NOTE)} {HOW_TO}</p>",
                     f"<p>{html.escape(recovery_words(json.loads(board.recovery)))}</p>" if board.recovery else "",
                     f"<h3>best method per model and sparsity</h3><p>{html.escape(BEST_NOTE)}</p>",
                     best.to_html(index=False),
                     "<h3>ranking</h3>", interactive(board_display(rank), f"board {i}: ranking"),
                     f"<h3>every cell</h3><p>{html.escape(CELLS_NOTE)}</p>",
                     interactive(cells_display(scores), f"board {i}: (model, sparsity) cells"),
                     "<h3>coverage: runs per method and cell (0: never ran there)</h3>", cover.to_html(),
                     *([f"<h3>paired tests: row − column, pooled over cells</h3><p>{html.escape(MATRIX_NOTE)}</p>",
                        grid.to_html()] if grid is not None else []),
                     *[part for measure, t in tests if len(t) for part in (
                         f"<h3>paired tests in each cell: {html.escape(measure_words(measure))}</h3>",
                         interactive(leaderboard.cell_significance_display(t, measure),
                                     f"board {i}: paired tests per cell, {measure}"))]]
        rankings.append(rank.assign(board=i, protocol=board.protocol, calibration=board.calibration))
        cell_rows.append(cells.assign(board=i, protocol=board.protocol, calibration=board.calibration))
        records.append({"board": i, "stage": stage, "protocol": board.protocol,
                        "calibration": json.loads(board.calibration or "{}"), "recovery": board.recovery,
                        "differs_from_board_1": differs, "experiments": records_of(board),
                        "ranking": _records(rank), "cells": _records(cells), "coverage": _records(cover.reset_index()),
                        "best": _records(best), "pairs": _records(leaderboard.significance_display(sig))})
    summary = {"experiments": experiments, "stage": stage, "stage_words": STAGE_WORDS[stage],
               "stores": [s.name for s in stores],
               "built": {"date": time.strftime("%Y-%m-%d"), "code": git_commit()[:12],
                         "machine": platform.node() or "unknown"},
               "runs": int((df["kind"] == "pruned").sum()), "duplicates_counted_once": duplicates, "boards": records}
    with output_dir(out, "leaderboard") as tmp:
        export(pd.concat(rankings), tmp / "leaderboard.csv")
        export(pd.concat(cell_rows), tmp / "cells.csv")
        (tmp / "leaderboard.json").write_text(json.dumps(summary, indent=1, default=str))
        (tmp / "leaderboard.md").write_text(markdown(json.loads(json.dumps(summary, default=str))))
        head = (f"{summary['runs']} pruned runs of {html.escape(', '.join(experiments))} from "
                f"{html.escape(', '.join(s.name for s in stores))}; {duplicates} found twice, counted once; "
                f"{len(found)} board(s). Data: <a href=\"leaderboard.json\">json</a> · "
                f"<a href=\"leaderboard.csv\">csv</a> · <a href=\"cells.csv\">cells csv</a> · "
                f"<a href=\"leaderboard.md\">markdown</a>")
        (tmp / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>prunebench leaderboard</title><style>{STYLE}{TABLES}</style></head><body>
{generate_init_offline_itables_html(options.dt_bundle)}
<h1>prunebench leaderboard ({html.escape(STAGES[stage])})</h1><p>{html.escape(stage_note(stage))} {head}</p>
{"".join(sections)}
<p>built in {time.perf_counter() - start:.1f} s</p></body></html>
""")
    return out / "index.html"


# filter boxes as wide as their column (their default width made tables wider than the page), and a scrolling box
# for boards with many columns: nothing is cut
TABLES = ("div.dt-layout-table{overflow-x:auto}"
          "table.dataTable tfoot input{width:100%;min-width:3em;box-sizing:border-box}")
HOW_TO = "Sort by a header; filter with the search box or the boxes below a table."


def markdown(summary: dict[str, Any]) -> str:
    """The leaderboard as Markdown, from its JSON alone (a results page is generated from the data, never copied):
    per board the best method per cell, the ranking, every cell and the pooled paired tests, with what the
    intervals, ranks and tests cover."""
    built = summary.get("built", {})
    lines = [f"# prunebench leaderboard ({summary['stage_words']})", "",
             f"Built {built.get('date', '?')} at code {built.get('code', '?')} on {built.get('machine', '?')} from "
             f"{summary['runs']} pruned runs of {', '.join(summary['experiments'])} "
             f"({summary['duplicates_counted_once']} found twice, counted once).", "", BOARD_NOTE, ""]
    for board in summary["boards"]:
        calibration = calibration_words(json.dumps(board["calibration"], sort_keys=True))
        lines += [f"## board {board['board']}: protocol {board['protocol']}", "", f"Calibration: {calibration}. "
                  f"Experiments: {', '.join(board['experiments'])}."
                  + (f" Differs from board 1 in: {board['differs_from_board_1']}." if board["differs_from_board_1"]
                     else ""), ""]
        ranking = pd.DataFrame(board["ranking"])
        cells = pd.DataFrame(board["cells"])
        cells["method"] = [marked(m, b) for m, b in zip(cells["method"], cells["broken"], strict=True)]
        sections = [("best method per model and sparsity", BEST_NOTE, pd.DataFrame(board["best"])),
                    ("ranking", "", board_display(ranking)),
                    ("every cell", CELLS_NOTE, cells),
                    ("paired tests, pooled over cells", MATRIX_NOTE, pd.DataFrame(board.get("pairs", [])))]
        for title, note, frame in sections:
            if len(frame):
                lines += [f"### {title}", ""] + ([note, ""] if note else []) + [frame_markdown(frame)]
    return "\n".join(lines).rstrip() + "\n"


def records_of(board: Board) -> list[str]:
    return sorted(board.pruned["experiment"].unique())


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.drop(columns=[c for c in LOCAL if c in df.columns]).to_json(orient="records"))


def main(argv: list[str]) -> int:
    """`python -m reports.board LEADERBOARD_JSON OUT_MD`: a committed results page from a leaderboard's JSON."""
    source, target = (Path(a) for a in argv)
    target.write_text(markdown(json.loads(source.read_text())))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
