"""DDP against hard-concrete L0 as `configs/ddp-vs-hc.yaml` and `configs/ddp-vs-hc-8x.yaml` record them, and the page
that reads them (docs/results-ddp-vs-hc.md).

Per model, sparsity, step budget, calibration size and variant (the published DDP, the published hard-concrete, DDP
with `preset: budget-safe`): the seed mean of test perplexity and mean task accuracy with a 95% t-interval over the
seeds, how far the relaxation got before the exact-budget projection (and how many runs missed by more than 2 points,
†), and the paired difference to hard-concrete seed by seed. Each run seed draws its own calibration sample, and the
methods of one seed share it, so the seed interval covers the method's and the calibration sample's randomness and
the pairing removes the calibration sample's effect from a difference. Every method of a cell is scored on the same
windows and items, so their noise is common to the methods and does not enter a paired difference.

    python -m reports.comparison WORKDIR benchmarks/ddp_vs_hc.json docs/results-ddp-vs-hc.md

writes the data and renders the page; a test re-renders the committed page from the committed data.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from reports.query import load_results
from suite.stats import ci95

EXPERIMENTS = ("ddp-vs-hc", "ddp-vs-hc-8x")
MISS = 0.02  # a relaxation further than this from its target is a projection result (†), as in every report
QUARTERS = (0.25, 0.5, 0.75, 1.0)  # where the hard-count trajectory is sampled, as fractions of the run
READING_MARKER = "\n<!-- reading: written by hand below this line, from the table above -->\n"


def variant(row: pd.Series) -> str:
    """The row's method as the page names it: the method, plus its preset when it has one."""
    preset = row.get("hp.preset")
    named = isinstance(preset, str) and preset not in ("", "None")  # MLflow records an unset preset as "None"
    return row["method_name"] + (f"[{preset}]" if named else "")


def _trajectory(artifacts: str) -> list[float]:
    """The hard sparsity at each quarter of the run, from the run's curves.json."""
    path = Path(artifacts) / "curves.json"
    if not artifacts or not path.is_file():
        return []
    curve = json.loads(path.read_text()).get("hard_sparsity", [])
    return [round(curve[max(0, math.ceil(q * len(curve)) - 1)], 4) for q in QUARTERS] if curve else []


def collect(workdir: Path, experiments: tuple[str, ...] = EXPERIMENTS) -> dict[str, Any]:
    """Every finished pruned run of the comparison, one record each, with the provenance of the measurement."""
    df = load_results(workdir, list(experiments))
    pruned = df[df["kind"] == "pruned"]
    ppl = next(c for c in pruned.columns if c.startswith("ppl."))
    rows = []
    for _, r in pruned.iterrows():
        rows.append({
            "model": r["model"], "sparsity": float(r["sparsity"]), "steps": int(r["hp.steps"]),
            "calibration_n": int(json.loads(r["calibration"])["n"]), "variant": variant(r), "seed": int(r["seed"]),
            "calibration_hash": r["calibration_hash"], "ppl": float(r[ppl]), "mean_acc": float(r["mean_acc"]),
            "relaxed_sparsity": float(r["diag_relaxed_sparsity"]),
            "projection_share": float(r["diag_projection_share"]),
            "multiplier_resets": int(r["diag_multiplier_resets"]),
            "hard_sparsity_quarters": _trajectory(r["artifacts"]), "code": r["code"],
        })
    rows.sort(key=lambda x: (x["model"], x["sparsity"], x["steps"], x["calibration_n"], x["variant"], x["seed"]))
    return {"what": "DDP vs hard-concrete, published defaults and DDP's budget-safe preset",
            "configs": [f"configs/{e}.yaml" for e in experiments], "perplexity": ppl,
            "date": time.strftime("%Y-%m-%d", time.gmtime(pruned["start_time"].max() / 1000)),
            "code": sorted(set(pruned["code"])), "machine": f"{platform.machine()}, {_cores()} CPU cores",
            "rows": rows}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def cells(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per (model, sparsity, steps, calibration size, variant): seed means, 95% t-intervals over seeds,
    budget misses, and the paired difference to hard-concrete on the same seeds."""
    rows = pd.DataFrame(data["rows"])
    keys = ["model", "sparsity", "steps", "calibration_n"]
    out = []
    for key, block in rows.groupby(keys, sort=True):
        reference = block[block["variant"] == "hard_concrete"].set_index("seed")
        for name, runs in block.groupby("variant", sort=True):
            line = dict(zip(keys, key, strict=True)) | {"variant": name, "seeds": len(runs)}
            for metric in ("ppl", "mean_acc", "relaxed_sparsity", "projection_share"):
                values = runs[metric].tolist()
                line[metric], line[f"{metric}_ci95"] = _mean(values), ci95(values)
            line["missed"] = int(((runs["relaxed_sparsity"] - runs["sparsity"]).abs() > MISS).sum())
            if name != "hard_concrete" and len(reference):
                paired = runs.set_index("seed")["ppl"] - reference["ppl"]
                paired = paired.dropna().tolist()
                line["ppl_vs_hc"], line["ppl_vs_hc_ci95"] = _mean(paired), ci95(paired)
                line["ppl_vs_hc_wins"] = f"{sum(d < 0 for d in paired)}/{len(paired)}"
            out.append(line)
    return out


def _pm(mean: float, half: float, fmt: str) -> str:
    """`mean ± half`, the half-width unsigned whatever the mean's format (a difference shows its sign)."""
    return format(mean, fmt) + ("" if half != half else f" ± {format(half, fmt.lstrip('+'))}")


def _reading(line: dict[str, Any]) -> str:
    """Whether the paired interval of a difference to hard-concrete excludes zero."""
    if "ppl_vs_hc" not in line or line["ppl_vs_hc_ci95"] != line["ppl_vs_hc_ci95"]:
        return ""
    low, high = line["ppl_vs_hc"] - line["ppl_vs_hc_ci95"], line["ppl_vs_hc"] + line["ppl_vs_hc_ci95"]
    return "better" if high < 0 else "worse" if low > 0 else "within noise"


def render(data: dict[str, Any]) -> str:
    """The results page (Markdown), from the data alone."""
    lines = [
        "# Results: DDP against hard-concrete L0",
        "",
        f"Generated by `python -m reports.comparison` from `benchmarks/ddp_vs_hc.json`: runs of "
        f"{' and '.join(f'`{c}`' for c in data['configs'])}, finished {data['date']}, code "
        f"{', '.join(data['code'])}, on {data['machine']}. Do not edit by hand: a test re-renders it.",
        "",
        "Test perplexity (`" + data["perplexity"].removeprefix("ppl.") + "`) and mean accuracy on the three "
        "embedded tasks (100 items each): mean ± 95% t-interval over the seeds, each seed with its own "
        "calibration draw (the interval covers the method's and the calibration sample's randomness; the "
        "evaluation items are the same for every row of a cell). *relaxed*: the sparsity the relaxation "
        f"reached before the exact-budget projection; † *missed*: runs more than {MISS:.0%} from the target. "
        "*vs hc*: the paired difference in perplexity to hard-concrete on the same seeds (same calibration "
        "sample), its 95% t-interval, and in how many seeds the row was lower. These runs were recorded before "
        "runs stored their item scores, so these intervals cover the seeds (and their calibration draws) but not "
        "the evaluation items' noise, which the reports' intervals now include ([statistics](statistics.md)).",
        "",
        "| model | sparsity | steps | calibration | method | ppl | mean acc | relaxed | † missed | ppl vs hc | "
        "lower in | reading |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells(data):
        dagger = " †" if c["missed"] else ""
        lines.append(
            f"| {c['model'].removeprefix('zoo:')} | {c['sparsity']:g} | {c['steps']} | {c['calibration_n']} x 128 | "
            f"{c['variant']}{dagger} | {_pm(c['ppl'], c['ppl_ci95'], '.2f')} | "
            f"{_pm(100 * c['mean_acc'], 100 * c['mean_acc_ci95'], '.1f')} | {c['relaxed_sparsity']:.3f} | "
            f"{c['missed']}/{c['seeds']} | "
            + (f"{_pm(c['ppl_vs_hc'], c['ppl_vs_hc_ci95'], '+.2f')} | {c['ppl_vs_hc_wins']} | {_reading(c)} |"
               if "ppl_vs_hc" in c else f"— | — | {'reference' if c['variant'] == 'hard_concrete' else '—'} |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    workdir, out_json, out_md = (Path(a) for a in argv)
    data = collect(workdir)
    out_json.write_text(json.dumps(data, indent=1) + "\n")
    old = out_md.read_text() if out_md.is_file() else ""
    reading = old.split(READING_MARKER, 1)[1] if READING_MARKER in old else ""
    out_md.write_text(render(data) + READING_MARKER + reading)  # the hand-written reading below the table stays
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
