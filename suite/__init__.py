"""prunebench's common core: model anatomy, masks, gates, compaction, the pruner contract and the CLI.

Importing `suite` must stay cheap: heavy dependencies (mlflow, optuna, lm_eval) are imported where used.
"""

__version__ = "0.1.0"
