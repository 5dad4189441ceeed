"""`prunebench report`: tables, heatmaps, plots and a leaderboard from an MLflow store, linked by one index.html.

Protocol guard: results measured under different protocols (evaluation data, window length, task versions, limit,
dtype) never share a table column or a rank. By default such a report is refused with the difference named;
`allow_mixed` reports each protocol in its own section, marked as such.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from reports import ablation, heatmaps, leaderboard, plots, tables, uncertainty
from reports.query import STAGES, export, load_results, read_masks, stage_view
from suite.errors import ConfigError
from suite.outputs import check_dir, output_dir
from suite.registry import Registry


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_")


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b) and path:
            return [f"{path}: {sorted(a)} vs {sorted(b)}"]
        out = []
        for key in sorted(set(a) | set(b)):
            if key != "hash" and a.get(key) != b.get(key):
                out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [f"{path}: {json.dumps(a)} vs {json.dumps(b)}"]


def protocol_difference(a: pd.Series, b: pd.Series) -> str:
    """What makes two protocols differ, in words: `ppl: ['embedded:test@128'] vs ['embedded:test@256']`."""
    try:
        diffs = _differences(json.loads(a["protocol_body"]), json.loads(b["protocol_body"]))
    except (TypeError, ValueError):
        diffs = []
    where = f"{a['experiment']}/{a['model']} vs {b['experiment']}/{b['model']}"
    return f"{where}: " + ("; ".join(diffs[:3]) if diffs else f"protocol {a['protocol']} vs {b['protocol']}")


def guard(df: pd.DataFrame, allow_mixed: bool) -> list[pd.DataFrame]:
    """One frame per protocol; refuse several unless `allow_mixed`."""
    groups = [g for _, g in df.groupby("protocol", sort=True)]
    if len(groups) > 1 and not allow_mixed:
        first = [g.iloc[0] for g in groups]
        raise ConfigError(f"refusing to merge results measured under {len(groups)} different protocols "
                          f"({protocol_difference(first[0], first[1])}); pick one with --latest or --protocol "
                          "HASH, or use --allow-mixed to report them in separate sections")
    return groups


@dataclass
class Page:
    """The report being written: files under `out`, and the HTML sections that link them."""

    out: Path
    sections: list[str] = field(default_factory=list)
    ablation: str = "marginal"  # the ablation view's other knobs: "marginal" (pooled) or "held" (one row per value)
    stage: str = "pruned"  # whose numbers the tables, plots and rankings show: "pruned" (w/o tune) or "recovered"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def write(self, relative: str, text: str) -> Path:
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def figure(self, png: Path | None, caption: str) -> str:
        if png is None:
            return ""
        pdf = png.with_suffix(".pdf")
        link = f' (<a href="{self.rel(pdf)}">PDF</a>)' if pdf.is_file() else ""
        return (f'<figure><img src="{self.rel(png)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}{link}</figcaption></figure>")

    def links(self, *paths: Path) -> str:
        return " · ".join(f'<a href="{self.rel(p)}">{p.suffix.lstrip(".")}</a>' for p in paths)


# A view is one part of a model's section: (page, that model's runs, model, file stem) -> HTML ('' to show nothing).
# Views run in registration order; a new one is a function decorated with @view in any imported module.
View = Callable[["Page", pd.DataFrame, str, str], str]
VIEWS: Registry[View] = Registry("report view")
view = VIEWS.register


def model_section(page: Page, runs: pd.DataFrame, model: str, prefix: str) -> str:
    """Every registered view of one model: table, Pareto/speed/cost plots, curves, heatmaps, cross-method views."""
    runs = runs[runs["model"] == model]
    name = f"{prefix}{slug(model)}"
    parts = [f"<h2>{html.escape(model)}</h2>", *(render(page, runs, model, name) for render in VIEWS.values())]
    return "\n".join(p for p in parts if p)


@view("table")
def table_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    """Method x sparsity, mean +- 95% CI over seeds, in HTML here and as Markdown, LaTeX, HTML and CSV files."""
    summary = tables.summarize(runs, model)
    files = table_files(page, summary, name)
    return f"<p>table ({html.escape(STAGE_WORDS[page.stage])}): {page.links(*files)}</p>\n{tables.html_table(summary)}"


@view("recovery")
def recovery_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    """w/o tune against w/ tune: every method's row right after pruning and after the experiment's recovery stage,
    side by side (LLM-Pruner's layout), when the runs have one."""
    both, order = tables.both_stages(runs)
    if both.empty:
        return ""
    summary = tables.summarize(both, model, order)
    spec = json.loads(both.loc[both["kind"] == "pruned", "recovery"].iloc[0])
    png = plots.recovery_curves(runs, page.out / "figures" / f"{name}_recovery", f"{model}: recovery")
    return (f"<h3>recovery: w/o tune and w/ tune</h3><p>{html.escape(recovery_words(spec))} Files: "
            f"{page.links(*table_files(page, summary, f'{name}_recovery'))}</p>\n{tables.html_table(summary)}"
            + page.figure(png, "training loss of each run's recovery, per step"))


def recovery_words(spec: dict[str, Any]) -> str:
    """A recovery stage in words, as a table's caption says it."""
    data = spec.get("data", {})
    lora = f"LoRA (r {spec.get('rank')}, alpha {spec.get('alpha')}, on {', '.join(spec.get('target_modules', []))})"
    how = {"lora": lora, "full": "every weight",
           "distill": f"distillation from the dense model's logits (T {spec.get('temperature')}, LM weight "
                      f"{spec.get('lm_weight')}, {spec.get('distill_weights')} weights)"}[spec.get("method", "lora")]
    return (f"w/ tune: {how}, {spec.get('steps')} steps of {spec.get('batch_size')} x {spec.get('seq_len')} tokens, "
            f"lr {spec.get('lr')}, on {data.get('n')} windows of {data.get('source')}:{data.get('split')} "
            f"(content {data.get('split_hash')}); the same for every method.")


def table_files(page: Page, summary: tables.Summary, name: str) -> list[Path]:
    """A summary as Markdown, LaTeX, HTML and CSV files under tables/."""
    files = [page.write(f"tables/{name}.md", tables.markdown(summary)),
             page.write(f"tables/{name}.tex", tables.latex(summary)),
             page.write(f"tables/{name}.html", tables.html_table(summary))]
    return [*files, export(tables.csv_frame(summary), page.out / "tables" / f"{name}.csv")]


@view("pareto")
def pareto_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    ppl = next((c for c in tables.columns(runs) if c.startswith("ppl.")), None)
    return page.figure(plots.pareto(runs, ppl, page.out / "figures" / f"{name}_pareto", model),
                       "sparsity vs perplexity and accuracy")


@view("speedup")
def speedup_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    return page.figure(plots.scatter_vs_accuracy(runs, tables.SPEED, "measured prefill speedup vs dense",
                                                 page.out / "figures" / f"{name}_speedup", model),
                       "speedup vs accuracy")


@view("cost")
def cost_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    return page.figure(plots.scatter_vs_accuracy(runs, "prune_seconds", "prune time (s)",
                                                 page.out / "figures" / f"{name}_cost", model, log_x=True),
                       "prune cost vs accuracy")


@view("curves")
def curves_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    return page.figure(plots.curves(runs, page.out / "figures" / f"{name}_curves", model),
                       "mask-learning curves and mismatch")


@view("ablation")
def ablation_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    """Per params grid: each metric against each knob (tables and a plot), and every two-knob interaction."""
    parts = []
    columns = ablation.metrics(runs)
    dense = runs[runs["kind"] == "dense"]
    for base, (knobs, block) in ablation.swept(runs).items():
        other = {"marginal": "the other knobs pooled (<code>--ablation held</code>: one row per value of each)",
                 "held": "one row per value of the other knobs (<code>--ablation marginal</code>: pooled)"}
        parts.append(f"<h3>ablation: {html.escape(base)} over {html.escape(', '.join(knobs))}</h3>"
                     f"<p>mean ± 95% interval over the runs of each cell (n) and, for perplexity and accuracies, "
                     f"the evaluation items too (one run: the items only), {other[page.ablation]}; † a run of the cell "
                     f"missed its budget: {html.escape(tables.MISS_NOTE.removeprefix('† '))}</p>")
        for knob in knobs:
            table = ablation.knob_table(block, knobs, knob, columns, page.ablation, dense)
            stem = f"{name}_ablation_{slug(base)}_{slug(knob)}"
            shown = ablation.display(table, columns)
            files = [export(table, page.out / "tables" / f"{stem}.csv"),
                     page.write(f"tables/{stem}.md", tables.frame_markdown(shown))]
            png = ablation.plot_knob(table, knob, columns, page.out / "figures" / stem,
                                     f"{model}: {base} against {knob}")
            parts += [f"<h4>{html.escape(knob)}</h4><p>files: {page.links(*files)}</p>",
                      shown.to_html(index=False), page.figure(png, f"{base}: each metric against {knob}")]
        for a, b in combinations(knobs, 2):
            for column in columns[:2]:
                for sparsity, table in ablation.interaction(block, a, b, column, dense).items():
                    stem = f"{name}_ablation_{slug(base)}_{slug(a)}_x_{slug(b)}_{slug(column)}_sp{sparsity:g}"
                    md = page.write(f"tables/{stem}.md", tables.frame_markdown(table.reset_index()))
                    parts += [f"<h4>{html.escape(a)} x {html.escape(b)}: {html.escape(tables.label(column))}, "
                              f"sparsity {sparsity:g}</h4><p>file: {page.links(md)}</p>", table.to_html()]
    return "\n".join(parts)


@view("masks")
def masks_view(page: Page, runs: pd.DataFrame, model: str, name: str) -> str:
    """What each method removed: a heatmap per run, per-layer sparsity profiles and the methods' overlap."""
    pruned = runs[runs["kind"] == "pruned"]
    masks = {i: read_masks(row) for i, row in pruned.iterrows()}
    heat = page.out / "heatmaps" / name
    parts = ["<h3>what each method removed</h3>"]
    for (sparsity, seed), cell in pruned.groupby(["sparsity", "seed"]):
        found = {row["method"]: masks[i] for i, row in cell.iterrows() if masks[i] is not None}
        if not found:
            continue
        tag = f"sp{sparsity:g}_seed{seed}"
        keeps = {method: {k: v.numpy() for k, v in m.keep.items()} for method, m in found.items()}
        for method, keep in keeps.items():
            png = heatmaps.plot_masks(keep, heat / f"{slug(method)}_{tag}", f"{model} {method} sp{sparsity:g}")
            parts.append(page.figure(png, f"{method}, sparsity {sparsity:g}, seed {seed}"))
        profiles = {method: heatmaps.layer_sparsity(keeps[method], m.meta) for method, m in found.items()}
        parts.append(page.figure(heatmaps.plot_profiles(profiles, heat / f"profiles_{tag}",
                                                        f"{model} sp{sparsity:g}: per-layer sparsity"),
                                 f"per-layer sparsity of every method, sparsity {sparsity:g}"))
        if len(keeps) > 1:
            names, matrix = heatmaps.jaccard(keeps)
            parts.append(page.figure(heatmaps.plot_jaccard(names, matrix, heat / f"jaccard_{tag}",
                                                           f"{model} sp{sparsity:g}: overlap of removed units"),
                                     f"Jaccard overlap of removed units, sparsity {sparsity:g}"))
    return "\n".join(p for p in parts if p)


STAGE_WORDS = {"pruned": "w/o tune: the pruned models as pruning left them",
               "recovered": "w/ tune: the pruned models after the experiment's recovery stage"}


def stage_note(stage: str) -> str:
    """Which stage a ranking ranks, in words (`--stage` picks the other)."""
    other = "recovered" if stage == "pruned" else "pruned"
    return f"Ranked stage: {STAGE_WORDS[stage]} (--stage {other} ranks the other)."


def leaderboard_section(page: Page, runs: pd.DataFrame, prefix: str) -> str:
    pruned = runs[runs["kind"] == "pruned"]
    rank = leaderboard.ranking(runs)
    if rank.empty:
        return ""
    order = list(rank["method"])
    win = leaderboard.win_rate(pruned, order)
    sig = leaderboard.significance(runs, order)
    grid = leaderboard.matrix(sig, order)
    cells = leaderboard.cell_scores(runs)
    tests = leaderboard.cell_significance_by_measure(runs)
    files = [export(rank, page.out / "tables" / f"{prefix}leaderboard.csv"),
             page.write(f"tables/{prefix}leaderboard.md", tables.frame_markdown(board_display(rank))
                        + missed_markdown(pruned)),
             page.write(f"tables/{prefix}leaderboard.tex", leaderboard_latex(rank)),
             export(cells, page.out / "tables" / f"{prefix}cells.csv"),
             export(win.reset_index(names="method"), page.out / "tables" / f"{prefix}win_rate.csv"),
             export(sig, page.out / "tables" / f"{prefix}significance.csv"),
             export(grid.reset_index(), page.out / "tables" / f"{prefix}significance_matrix.csv")]
    files += [export(t, page.out / "tables" / f"{prefix}tests_{slug(measure)}.csv") for measure, t in tests if len(t)]
    missed = leaderboard.missed_runs(pruned)
    if len(missed):
        files.append(export(missed, page.out / "tables" / f"{prefix}missed_budget.csv"))
    png = leaderboard.plot_win_rate(win, page.out / "figures" / f"{prefix}win_rate")
    missed_html = ["<h3>runs whose relaxation missed its budget</h3>", f"<p>{html.escape(tables.MISS_NOTE)}</p>",
                   missed.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="–")] if len(missed) else []
    return "\n".join([
        f"<h2>leaderboard ({html.escape(STAGES[page.stage])})</h2>",
        f"<p>{html.escape(stage_note(page.stage))} {html.escape(BOARD_NOTE)} Files: {page.links(*files)}</p>",
        board_display(rank).to_html(index=False), *missed_html,
        f"<h3>every cell</h3><p>{html.escape(CELLS_NOTE)}</p>", cells_display(cells).to_html(index=False),
        page.figure(png, "win rate: share of shared (model, sparsity, seed) cells where the row beats the column "
                         "(descriptive: no test)"),
        f"<h3>paired tests, pooled over cells: effect and Holm-corrected p</h3><p>{html.escape(MATRIX_NOTE)}</p>",
        grid.to_html(), leaderboard.significance_display(sig).to_html(index=False),
        *[f"<h3>paired tests in each cell: {html.escape(measure_words(m))}</h3>"
          + leaderboard.cell_significance_display(t, m).to_html(index=False) for m, t in tests if len(t)]])


INTERVAL_WORDS = ("a 95% interval over seeds and evaluation items together (each seed prunes with its own calibration "
                  "draw, so seed spread includes calibration spread; items are a task's documents or a perplexity's "
                  "windows); with one seed it covers the items only and says so (n = 1 seed): what another seed would "
                  "change is not in it")
RANK_WORDS = ("a rank is a 95% rank interval: the ranks the method took in 95% of 1,000 bootstrap draws that resample "
              "seeds and items jointly (the same items for every method), so 1–3 means the data cannot place it "
              "more precisely than first to third")
BOARD_NOTE = ("Methods ranked by retained accuracy (mean task accuracy as % of the dense model's on the same items), "
              "averaged over the (model, sparsity) cells every ranked method covers, each cell weighing the same. "
              f"Each cell's ± is {INTERVAL_WORDS}; the ranking's ± is the mean of its cells' (a bound: the cells share "
              f"their items). {RANK_WORDS.capitalize()}. A method missing a cell is listed unranked with its "
              f"coverage; broken: runs whose perplexity is above the vocabulary size (✗).")
CELLS_NOTE = (f"Per cell, best first: ± and [low, high] are {INTERVAL_WORDS}; perplexity is exp of the mean token NLL "
              f"over windows and seeds, its interval exp of the NLL's; {RANK_WORDS}. "
              + uncertainty.BROKEN_NOTE)
MATRIX_NOTE = ("Row minus column, in accuracy points, each cell's difference paired on the seeds both ran and the "
               "items every run scored (a crossed seeds x items test, t with Satterthwaite's degrees of freedom, "
               "calibrated by simulation in the test suite), pooled over the cells both ran with the mean of their "
               "standard errors (conservative); p is Holm-corrected over all pairs (* below 0.05). With one seed a "
               "test says the two pruned models differ on these items' population, not that the methods would at "
               "another seed.")
BEST_NOTE = ("A method is named best in a cell only where its paired test against the runner-up is significant after "
             "Holm's correction over every pair of every cell; otherwise the cell says no separation and lists the "
             "tied set: the highest and every method it is not significantly better than. Broken models are never "
             "named best.")


def measure_words(measure: str) -> str:
    """A measure as a heading reads it."""
    return "accuracy (points)" if measure == uncertainty.ACC else f"{measure.removeprefix('ppl.')} perplexity (NLL)"


def summary_block(page: Page, runs: pd.DataFrame, prefix: str) -> str:
    """First in the report: the best method per model and sparsity where the data separate it, with its 95%
    interval, or no separation and the tied set."""
    best = leaderboard.best_per_cell(runs)
    if best.empty:
        return ""
    files = [export(best, page.out / "tables" / f"{prefix}summary.csv"),
             page.write(f"tables/{prefix}summary.md", tables.frame_markdown(best))]
    return (f"<h2>summary: best method per model and sparsity ({html.escape(STAGES[page.stage])})</h2>"
            f"<p>{html.escape(BEST_NOTE)} Retained accuracy (% of dense mean task accuracy) and perplexity of the "
            f"highest, with {html.escape(INTERVAL_WORDS)}. Files: {page.links(*files)}</p>"
            + best.to_html(index=False))


def cells_display(scores: pd.DataFrame, mark: bool = True) -> pd.DataFrame:
    """Per cell and method: retained accuracy and perplexity, each with its 95% interval and 95% rank interval within
    the cell, the seeds (n) and what the intervals cover; broken models marked ✗ (`mark`: for reading; the data files
    keep the plain name beside the `broken` count)."""
    frame = scores.copy()
    if mark:
        frame["method"] = [marked(m, b) for m, b in zip(frame["method"], frame["broken"], strict=True)]
    frame["retained acc %"] = [leaderboard.interval_text(m, c)
                               for m, c in zip(frame["retained_acc_%"], frame["ci95"], strict=True)]
    frame["ppl [95%]"] = [leaderboard.ppl_text(v, lo, hi)
                          for v, lo, hi in zip(frame["ppl"], frame["ppl_low"], frame["ppl_high"], strict=True)]
    frame = frame.rename(columns={"rank": "rank (95%)", "ppl_rank": "ppl rank (95%)", "ci_from": "covers"})
    return frame[["model", "sparsity", "rank (95%)", "method", "retained acc %", "ppl [95%]", "ppl rank (95%)", "n",
                  "covers", "missed_budget", "broken"]]


def marked(method: str, broken: int) -> str:
    """A method's name as tables show it: with ✗ when a run of it is broken (reports.uncertainty.BROKEN_NOTE)."""
    return f"{method} ✗" if broken else str(method)


def board_display(rank: pd.DataFrame) -> pd.DataFrame:
    """A ranking as read: the 95% rank interval, 'mean ± ci' in one column, '–' where there is no number, ✗ on a
    method with a broken run."""
    out = pd.DataFrame({"rank (95%)": rank["rank"],
                        "method": [marked(m, b) for m, b in zip(rank["method"], rank["broken"], strict=True)]})
    out["retained acc %"] = [leaderboard.interval_text(m, c)
                             for m, c in zip(rank["retained_acc_%"], rank["ci95"], strict=True)]
    return out.join(rank[["cells", "runs", "missed_budget", "broken"]])


def missed_markdown(pruned: pd.DataFrame) -> str:
    """The leaderboard's list of projection results, as Markdown ('' when every relaxation met its budget)."""
    missed = leaderboard.missed_runs(pruned)
    return "" if missed.empty else f"\n{tables.MISS_NOTE}\n\n" + tables.frame_markdown(missed)


def leaderboard_latex(rank: pd.DataFrame) -> str:
    shown = board_display(rank)
    lines = [r"\begin{tabular}{llrrrrr}", r"\toprule",
             r"rank (95\%) & method & retained acc (\%) & cells & runs & missed budget & broken \\", r"\midrule"]
    for _, r in shown.iterrows():
        lines.append(" & ".join(tables.tex_escape(str(r[c])) for c in shown.columns) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border-bottom:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}
.warn{background:#fee;border:1px solid #c00;padding:.6em}"""


def calibration_words(spec: str) -> str:
    """A calibration specification in a few words: source:split, n x length, and its draw rule."""
    c = json.loads(spec or "{}")
    if not c:
        return "none"
    seed = c.get("seed")
    # runs recorded before the setting existed all used one draw; MLflow gives the flag back as text
    fixed = str(c.get("fixed_draw", True)).lower() == "true"
    draw = f"one draw for every run seed (seed {seed})" if fixed else f"each run seed s its own draw (seed {seed} + s)"
    return (f"{c.get('source')}:{c.get('split')}, {c.get('n')} sequences x {c.get('seq_len')} tokens "
            f"(+{c.get('valid_n')} held out), {draw}")


def protocol_words(runs: pd.DataFrame) -> str:
    """The evaluation protocol and calibration of these runs, in words (HTML)."""
    try:
        body = json.loads(runs["protocol_body"].iloc[0])
    except (TypeError, ValueError, IndexError):
        return ""
    parts = []
    if body.get("tasks"):
        tasks = ", ".join(f"{t} (v{i.get('version')})" for t, i in body["tasks"].items())
        limit = body.get("limit")
        step = 100 / limit if limit else 0
        each = (f"the first {limit} items of each (one item moves a task's accuracy by {step:.2g} point"
                f"{'' if step == 1 else 's'})" if limit else "every item")
        parts.append(f"tasks {tasks}: {', '.join(body.get('metric', []))} on {each}")
    for name, p in body.get("ppl", {}).items():
        parts.append(f"perplexity on {name} (source:split@tokens per window/windows, {p.get('mode')})")
    parts.append(f"weights in {body.get('dtype')}; lm-eval {body.get('lm_eval')}")
    pruned = runs[runs["kind"] == "pruned"]
    if "calibration" in pruned and len(pruned):
        for text in sorted(pruned["calibration"].dropna().unique()):
            if json.loads(text or "{}"):
                parts.append(f"calibration {calibration_words(text)}")
    if "units" in pruned and len(pruned):
        for (model, units), _ in pruned.groupby(["model", "units"], sort=True):
            parts.append(f"{model}: pruned unit kinds {units.replace(',', ' + ') or 'not recorded'}")
    return ("<p class=\"protocol\"><b>protocol</b> " + html.escape(runs["protocol"].iloc[0]) + ": "
            + html.escape("; ".join(parts)) + ".</p>")


def pick_protocol(df: pd.DataFrame, protocol: str | None, latest: bool) -> pd.DataFrame:
    """The runs of one protocol: the one whose hash starts with `protocol`, or (`latest`) the protocol of the most
    recently started run; every run when neither is asked."""
    if protocol is not None:
        picked = df[df["protocol"].str.startswith(protocol)]
        found = sorted(picked["protocol"].unique())
        if len(found) != 1:
            known = ", ".join(sorted(df["protocol"].unique()))
            what = "matches no" if not found else "matches more than one"
            raise ConfigError(f"--protocol {protocol} {what} protocol of these runs ({known})")
        return picked
    if latest:
        return df[df["protocol"] == df.loc[df["start_time"].idxmax(), "protocol"]]
    return df


def build_report(workdir: Path, experiments: list[str], out: Path, uri: str | None = None,
                 allow_mixed: bool = False, log_to_store: bool = False, protocol: str | None = None,
                 latest: bool = False, ablation_mode: str = "marginal", stage: str = "pruned") -> Path:
    """Write the report under `out` and return its index.html: every table, plot and ranking at `stage` ("pruned":
    w/o tune; "recovered": w/ tune), plus the two stages side by side where runs have a recovery stage. The store is
    only read, unless `log_to_store` (then the report is also logged on each experiment's parent run)."""
    start = time.perf_counter()
    check_dir(out, "report")  # before any work: never replace what prunebench did not write
    df = load_results(workdir, experiments, uri)
    if df.empty:
        raise ConfigError(f"no finished runs in experiment(s) {', '.join(experiments)} under {workdir}")
    df = stage_view(pick_protocol(df, protocol, latest), stage)
    groups = guard(df, allow_mixed)
    with output_dir(out, "report") as tmp:  # a failed or killed build leaves the previous report whole
        page = Page(tmp, ablation=ablation_mode, stage=stage)
        plots.palette(sorted(df["method"].unique()))
        export(df, tmp / "results.csv")
        export(df, tmp / "results.parquet")
        mixed = len(groups) > 1
        for i, runs in enumerate(groups):
            prefix = f"protocol{i + 1}_" if mixed else ""
            if mixed:
                page.sections.append(f'<h1 class="warn">protocol {i + 1} of {len(groups)} '
                                     f"({html.escape(runs['protocol'].iloc[0])}): not comparable with the other "
                                     "sections (--allow-mixed)</h1>")
            page.sections.append(protocol_words(runs))
            page.sections.append(summary_block(page, runs, prefix))
            page.sections.append(leaderboard_section(page, runs, prefix))
            page.sections += [model_section(page, runs, model, prefix) for model in sorted(runs["model"].unique())]
        note = ('<p class="warn">MIXED PROTOCOLS: sections below were measured under different protocols and are '
                "never ranked together.</p>") if mixed else ""
        body = "\n".join(page.sections)
        page.write("index.html", f"""<!doctype html><html><head><meta charset="utf-8">
<title>prunebench report: {html.escape(', '.join(experiments))}</title><style>{STYLE}</style></head><body>
<h1>prunebench report: {html.escape(', '.join(experiments))}</h1>{note}
<p>{len(df[df['kind'] == 'pruned'])} pruned runs, {len(df[df['kind'] == 'dense'])} dense; protocol(s)
{html.escape(', '.join(sorted(df['protocol'].unique())))}; all runs: <a href="results.csv">csv</a> ·
<a href="results.parquet">parquet</a>. Tables: mean ± 95% CI over seeds where there are several; best pruned value
per column and sparsity in bold. Numbers: {html.escape(STAGE_WORDS[stage])}.</p>
{body}
</body></html>
""")
        (tmp / "report.json").write_text(json.dumps({"experiments": experiments, "runs": len(df), "mixed": mixed,
                                                     "seconds": round(time.perf_counter() - start, 2)}))
    if log_to_store:
        from suite.run.tracking import Tracker

        for name in experiments:
            tracker = Tracker(workdir, name, uri, create=False)
            tracker.log_artifacts(tracker.parent(), out, artifact_path="report")
    return out / "index.html"
