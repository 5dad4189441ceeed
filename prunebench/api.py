"""The Python API, for a model a researcher already holds in memory (as LLM-Pruner, Torch-Pruning and llm-compressor
users work): `prune` and `evaluate` run the same code paths as `prunebench prune` and `prunebench eval`, so their
numbers mean the same thing.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import prunebench

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, report = prunebench.prune(model, tokenizer, method="wanda_sp", sparsity=0.2,
                                     calibration={"n": 32, "seq_len": 128})
    scores = prunebench.evaluate(model, tokenizer, ppl=["embedded:test@256/64"], limit=100)

Bad settings raise `suite.errors.PruneBenchError` with the same one-line message the CLI prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn


def prune(model: nn.Module, tokenizer: Any = None, *, method: str, sparsity: float,
          calibration: Mapping[str, Any] | None = None, seed: int = 0, granularity: str = "kv_group",
          device: str | None = None, target: Mapping[str, Any] | None = None,
          **settings: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model` in place to `sparsity` with `method` (its published defaults, changed by `settings`) and compact
    it; returns the compact model and the report `prunebench prune` writes as metrics.json (achieved sparsity,
    parameters, compact-vs-gated check, prune seconds, the method's diagnostics, `weights_changed`).

    `calibration`: a calibration spec (`source`, `n`, `seq_len`, ...; the method's defaults otherwise), drawn with
    `tokenizer` for the methods that read data; `target`: the other target settings (`units`, `uniform`,
    `skip_layers`, `min_keep`, `round_to`)."""
    from suite.data.calibration import CalibrationSpec
    from suite.errors import PruneBenchError
    from suite.methods.pruner import get_method
    from suite.model.masks import Target
    from suite.model.structures import check_granularity
    from suite.run.config import apply_overrides
    from suite.run.pipeline import prune_model

    check_granularity(granularity)
    cls = get_method(method)
    config = apply_overrides(cls.Config, dict(settings), (), where=f"{method}.")
    goal = apply_overrides(Target, {**(target or {}), "sparsity": sparsity}, (), where="target.")
    data = None
    if cls.needs_calibration:
        if tokenizer is None:
            raise PruneBenchError(f"{method} needs calibration text: pass the model's tokenizer")
        data = apply_overrides(CalibrationSpec, dict(calibration or {}), (), where="calibration.").build(tokenizer,
                                                                                                          seed)
    outcome = prune_model(model, cls(config), goal, seed=seed, granularity=granularity, calibration=data,
                          device=device)
    return model, outcome.metrics


def evaluate(model: nn.Module, tokenizer: Any, *, ppl: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
             limit: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Perplexities and task accuracies of `model`, with the protocol fingerprint, as `prunebench eval` gives them
    (and each task item's score and each window's NLL, which the reports' intervals read). Defaults: the embedded
    test split and the embedded tasks."""
    from suite.evaluation.evaluate import EvalSpec
    from suite.evaluation.evaluate import evaluate as run
    from suite.run.config import apply_overrides

    given = {"ppl": ppl, "tasks": tasks, "limit": limit, "batch_size": batch_size}
    spec = apply_overrides(EvalSpec, {k: v for k, v in given.items() if v is not None}, (), where="evaluation.")
    return run(model, tokenizer, spec)
