"""prunebench's library, in floors (docs/architecture.md): errors and atomic I/O at the bottom, then model anatomy
and data, evaluation and the method SDK, orchestration (`suite.run`), and benches, fakes and zoo training on top.
The command line (`prunebench.cli`) composes it with `reports`.

Importing `suite` must stay cheap: heavy dependencies (mlflow, optuna, lm_eval) are imported where used.
"""

__version__ = "0.1.0"
