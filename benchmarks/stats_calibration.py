"""The paired test's rejection rate under the null and its power, by simulation (the settings of tests/test_stats.py,
more of them): `python benchmarks/stats_calibration.py` writes benchmarks/stats_calibration.json and prints the
Markdown table docs/statistics.md shows."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from suite.stats import crossed
from tests.test_stats import SIMULATIONS, _bernoulli_pair

SETTINGS = [  # seeds, seed main effect (logit sd), a method's own item effects (logit sd), effect (logit)
    (1, 0.0, 0.0, 0.0), (1, 0.0, 0.5, 0.0), (1, 0.4, 0.0, 0.0),
    (3, 0.0, 0.0, 0.0), (3, 0.4, 0.0, 0.0), (3, 1.0, 0.0, 0.0), (3, 0.4, 0.5, 0.0),
    (5, 0.0, 0.0, 0.0), (5, 0.4, 0.0, 0.0), (5, 0.4, 0.5, 0.0),
    (3, 0.4, 0.0, 0.5), (5, 0.4, 0.0, 0.5), (5, 0.4, 0.0, 1.0),
]


def main() -> None:
    rows = []
    for seeds, seed_sd, own_sd, effect in SETTINGS:
        rng = np.random.default_rng(1000 + len(rows))
        a, b = _bernoulli_pair(rng, seeds, seed_sd, own_sd=own_sd, effect=effect)
        est = crossed([a - b])
        rows.append({"seeds": seeds, "seed_sd": seed_sd, "own_item_sd": own_sd, "effect_logit": effect,
                     "rejection_rate": float((est.p < 0.05).mean()), "median_df": float(np.median(est.df))})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.node() or "unknown",
           "simulations": SIMULATIONS, "items": 100, "rows": rows}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=1))
    print("| seeds | seed effect sd | method's own item effects sd | true effect | rejected at 0.05 | median df |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seeds']} | {r['seed_sd']} | {r['own_item_sd']} | {r['effect_logit']} | "
              f"{100 * r['rejection_rate']:.1f}% | {r['median_df']:.1f} |")


if __name__ == "__main__":
    main()
