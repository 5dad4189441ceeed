"""Evaluation: perplexity (own batched implementation), lm-eval tasks, speed, and the protocol fingerprint."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from torch import Tensor, nn

from suite.data.tasks import EMBEDDED_TASKS, task_dir
from suite.errors import ConfigError, DataError
from suite.hashing import json_digest
from suite.model.loss import token_nll
from suite.model.structures import param_count

PPL_MODES = ("chunks", "rolling")
# lm-eval's item-level stderr: accuracies (a mean over items) get its closed form, sqrt(p(1-p)/(n-1)); this many
# bootstrap draws only for a task whose metric has none (median, F1)
STDERR_BOOTSTRAP = 100


@torch.no_grad()
def perplexity(
    model: nn.Module, stream: Tensor, seq_len: int, batch_size: int = 8, mode: str = "chunks",
    prefix_token: int | None = None, windows: int | None = None,
) -> dict[str, Any]:
    """exp(mean token NLL) over non-overlapping windows of `seq_len` tokens.

    `chunks` (default; the LLM-Pruner/SparseGPT convention): the stream is cut into windows, the
    remainder dropped, no BOS per window, and each window's first token is context only. `rolling` (lm-eval's
    loglikelihood_rolling): every token is predicted, the first from `prefix_token`, each window's context
    restarting at the window; the last window may be short. Rolling counts the window-start tokens that chunks
    leave out (with one token of context) and the remainder, so the two read differently on the same text.

    `windows` (chunks only) scores that many windows spread evenly over the whole stream instead of all of them: a
    cheaper estimate that still sees every part of the split, for quick runs; it is part of the protocol."""
    if mode not in PPL_MODES:
        raise ConfigError(f"unknown perplexity mode {mode!r}; allowed: {', '.join(PPL_MODES)}")
    if windows is not None and mode != "chunks":
        raise ConfigError("a window budget applies to chunks perplexity only")
    if mode == "chunks":
        n = len(stream) // seq_len
        if n == 0:
            raise ValueError(f"stream of {len(stream)} tokens is shorter than one window of {seq_len}")
        chunks = stream[: n * seq_len].view(n, seq_len)
        if windows is not None and windows < n:
            chunks = chunks[torch.linspace(0, n - 1, windows).round().long()]
        inputs, targets = chunks[:, :-1], chunks[:, 1:]
        pieces = [(inputs, targets)]
    else:
        prefix = torch.tensor([prefix_token if prefix_token is not None else model.config.eos_token_id])
        full = torch.cat([prefix, stream])
        x, y = full[:-1], full[1:]
        n = len(y) // seq_len
        pieces = [(x[: n * seq_len].view(n, seq_len), y[: n * seq_len].view(n, seq_len))]
        if len(y) % seq_len:
            pieces.append((x[n * seq_len :][None], y[n * seq_len :][None]))
    device = next(model.parameters()).device
    window_nll: list[float] = []  # each window's summed token NLL: the items a perplexity's interval resamples
    window_tokens: list[int] = []
    for inputs, targets in pieces:
        for xb, yb in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
            logits = model(xb.to(device)).logits.float()
            per_token = token_nll(logits, yb.to(device), reduction="none").view(yb.shape)
            window_nll += per_token.sum(dim=1).tolist()
            window_tokens += [yb.shape[1]] * len(yb)
    nll, count = math.fsum(window_nll), sum(window_tokens)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "seq_len": seq_len, "mode": mode,
            "windows": {"nll": window_nll, "tokens": window_tokens}}


# ---------------------------------------------------------------------------------------------------------------
# protocol


@dataclass(frozen=True)
class PplSpec:
    """Perplexity protocol: text source, split, window length and optionally how many windows, spread evenly
    over the split. Written `SOURCE[:SPLIT]@SEQ_LEN[/WINDOWS]` (chunks mode)."""

    source: str = "embedded"
    split: str = "test"
    seq_len: int = 256
    mode: str = "chunks"
    windows: int | None = None

    @classmethod
    def parse(cls, text: str) -> PplSpec:
        body, _, tail = text.partition("@")
        source, _, split = body.partition(":")
        seq, _, windows = tail.partition("/")
        try:
            spec = cls(source or "embedded", split or "test", int(seq) if seq else 256,
                       windows=int(windows) if windows else None)
        except ValueError:
            spec = None
        if spec is None or spec.seq_len < 2 or (spec.windows is not None and spec.windows < 1):
            raise ConfigError(f"perplexity spec {text!r}: expected SOURCE[:SPLIT]@SEQ_LEN[/WINDOWS], e.g. "
                              "wikitext2:test@128 or embedded:test@256/128")
        return spec

    def __str__(self) -> str:
        return f"{self.source}:{self.split}@{self.seq_len}" + (f"/{self.windows}" if self.windows else "")


def _ppl_spec(value: Any) -> Any:
    return PplSpec.parse(value) if isinstance(value, str) else value


PplField = Annotated[PplSpec, BeforeValidator(_ppl_spec), PlainSerializer(str, return_type=str)]


class EvalSpec(BaseModel):
    """What an evaluation measures (an experiment's `evaluation:` section, `prunebench eval`'s flags); its
    fingerprint, the protocol, goes with every number it produces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ppl: tuple[PplField, ...] = Field((PplSpec(),), description="SOURCE[:SPLIT]@SEQ_LEN[/WINDOWS], e.g. "
                                      "embedded:test@256 or wikitext2:test@128")
    tasks: tuple[str, ...] = Field(EMBEDDED_TASKS, description="lm-eval tasks (the embedded pb_* tasks by default)")
    limit: int | None = Field(None, ge=1, description="items per task (recorded in the protocol)")
    batch_size: int = Field(16, ge=1, description="batch size of perplexity windows and task requests")
    speed: bool = Field(False, description="measure prefill/decode speed of the compact model vs the dense one")


def protocol(spec: EvalSpec, task_info: dict[str, dict[str, Any]], ppl_hashes: dict[str, str],
             dtype: str) -> dict[str, Any]:
    """The protocol fingerprint: everything that makes two numbers comparable (or not)."""
    from importlib.metadata import version

    body = {
        "lm_eval": version("lm_eval"),
        "tasks": task_info,
        "metric": ["acc", "acc_norm"],
        "limit": spec.limit,
        "ppl": {str(p): {"data_hash": ppl_hashes.get(str(p)), "mode": p.mode, "bos_per_window": False}
                for p in spec.ppl},
        "dtype": dtype,
    }
    body["hash"] = json_digest(body, length=16)
    return body


# ---------------------------------------------------------------------------------------------------------------
# lm-eval tasks


@functools.cache
def _task_manager(include: str, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults, verbosity="ERROR")


@functools.cache
def _lm_eval_task_text() -> str:
    from pathlib import Path

    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return "\n".join(p.read_text(errors="ignore") for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".py"))


def check_tasks(tasks: tuple[str, ...]) -> Any:
    """lm-eval's TaskManager for these tasks (indexing lm-eval's own takes half a minute: once per process), or a
    one-line error naming the unknown ones. A name that no file of lm-eval's task folder mentions is refused at
    once (a typo costs a second, not the index)."""
    standard = [t for t in tasks if t not in EMBEDDED_TASKS]
    unknown = [t for t in standard if t not in _lm_eval_task_text()]
    manager = None if unknown else _task_manager(str(task_dir("test")[0]), bool(standard))
    if manager is not None:
        unknown = [t for t in standard if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}; embedded tasks: {', '.join(EMBEDDED_TASKS)}")
    return manager


def run_tasks(
    model: nn.Module, tokenizer: Any, tasks: tuple[str, ...], limit: int | None = None, batch_size: int = 16
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Score lm-eval tasks on the in-memory model: ({task: {acc, acc_norm, n}}, {task: version + data hash}).

    Embedded tasks are local files; standard tasks by name need the hub (or its cache) for their data."""
    import lm_eval

    from suite.evaluation.harness import SharedContextLM
    from suite.hub import hub_unreachable_reason, offline

    standard = [t for t in tasks if t not in EMBEDDED_TASKS]
    hashes = task_dir("test")[1]
    reason = hub_unreachable_reason() if standard else "only local tasks"
    manager = check_tasks(tasks)
    device = next(model.parameters()).device
    max_length = getattr(model.config, "max_position_embeddings", 2048)
    with _quiet_lm_eval():
        lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size,
                             max_length=max_length)
    context = offline() if reason else contextlib.nullcontext()
    try:
        with context, _quiet_datasets(), _quiet_lm_eval(), _no_environment_report():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          log_samples=True, bootstrap_iters=STDERR_BOOTSTRAP, verbosity="ERROR")
    except (ConnectionError, OSError) as err:
        raise DataError(f"cannot load data for tasks {standard}: {reason or str(err).splitlines()[0]}") from None
    scores, info = {}, {}
    for task in tasks:
        r = out["results"][task]
        scores[task] = {"acc": r["acc,none"], "acc_norm": r.get("acc_norm,none", r["acc,none"]),
                        "n": int(out["n-samples"][task]["effective"]), "acc_stderr": _number(r.get("acc_stderr,none")),
                        "items": _items(out["samples"][task])}
        info[task] = {"version": out["versions"].get(task), "data_hash": hashes.get(task, "hub")}
    return scores, info


def _items(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each scored item's accuracy by its document id, in id order: what an interval over items, and a comparison
    paired on the same items, are computed from (every run of a protocol scores the same documents)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return {"doc_id": [int(s["doc_id"]) for s in ordered], "acc": [float(s["acc"]) for s in ordered]}


def _number(value: Any) -> float:
    """lm-eval's stderr, or NaN where it has none ("N/A": a single item)."""
    return float(value) if isinstance(value, int | float) else math.nan


@contextlib.contextmanager
def _no_environment_report():
    """Skip lm-eval's end-of-run environment report: it shells out to `pip list`, `git` and torch's collect_env
    (0.6 s an evaluation, and a `fatal: not a git repository` line outside a checkout), and nothing here reads
    it; the protocol fingerprint records what matters. The scores are untouched."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda _results: None), (lambda: None)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval warns that an in-memory `pretrained` "is not of type str" and was "passed already initialized": both
    describe exactly how prunebench calls it, so they are silenced. Its per-task request bar is off when stderr is
    not a terminal (in a log it is only cursor codes)."""
    import logging
    import sys

    import lm_eval.api.task as task_module

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    saved_level, saved_tqdm = hf_logger.level, task_module.tqdm
    hf_logger.setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        task_module.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logger.setLevel(saved_level)
        task_module.tqdm = saved_tqdm


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    from suite.hub import environ

    datasets.disable_progress_bars()
    with environ(HF_DATASETS_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "0")):
        yield


# ---------------------------------------------------------------------------------------------------------------
# everything at once


def check_positions(config: Any, lengths: dict[str, int]) -> None:
    """Refuse a window longer than the model's positions (it would be silently scored past its training range)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for what, n in lengths.items():
        if n > limit:
            raise ConfigError(f"{what}: {n} tokens is beyond the model's {limit} positions (max_position_embeddings)")


def evaluate(model: nn.Module, tokenizer: Any, spec: EvalSpec, progress: bool = False) -> dict[str, Any]:
    """Perplexities + task accuracies + the protocol fingerprint, as one flat-ish dict."""
    from suite.data.sources import load_source, token_stream

    result: dict[str, Any] = {"ppl": {}, "tasks": {}}
    ppl_hashes = {}
    check_positions(model.config, {f"ppl {p}": p.seq_len for p in spec.ppl})
    for p in spec.ppl:
        source = load_source(p.source)
        result["ppl"][str(p)] = perplexity(model, token_stream(source, p.split, tokenizer), p.seq_len, mode=p.mode,
                                           windows=p.windows)
        ppl_hashes[str(p)] = source.hashes[p.split]
    info: dict[str, dict[str, Any]] = {}
    if spec.tasks:
        result["tasks"], info = run_tasks(model, tokenizer, spec.tasks, spec.limit, spec.batch_size)
        accs = [v["acc"] for v in result["tasks"].values()]
        result["mean_acc"] = sum(accs) / len(accs)
    # a uniform guess over the vocabulary has perplexity exactly this: a model above it is broken (reports mark it)
    result["vocab_size"] = getattr(model.config, "vocab_size", None)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # what the numbers were computed in
    result["protocol"] = protocol(spec, info, ppl_hashes, dtype)
    return result


# ---------------------------------------------------------------------------------------------------------------
# speed



@torch.no_grad()
def _prefill_seconds(model: nn.Module, ids: Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_seconds_per_token(model: nn.Module, ids: Tensor, new_tokens: int) -> float:
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / new_tokens


def speed(
    model: nn.Module, reference: nn.Module, *, batch: int = 4, prefill_len: int = 256, decode_tokens: int = 32,
    repeats: int = 5, seed: int = 0,
) -> dict[str, float]:
    """Prefill tokens/s and decode ms/token of `model` vs `reference`, interleaved in one process (alternating
    order every repeat so drift hits both), medians over repeats, with the ideal ratio from parameter counts."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, reference.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, prefill_len), generator=gen).to(next(model.parameters()).device)
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in ("model", "reference")}
    pair = [("model", model), ("reference", reference)]
    _prefill_seconds(model, ids), _prefill_seconds(reference, ids)  # warm-up
    for r in range(repeats):
        for name, m in pair if r % 2 == 0 else pair[::-1]:
            times[name]["prefill"].append(_prefill_seconds(m, ids))
            times[name]["decode"].append(_decode_seconds_per_token(m, ids[:1, :16], decode_tokens))
    med = {k: {t: statistics.median(v) for t, v in d.items()} for k, d in times.items()}
    prefill = {k: batch * prefill_len / med[k]["prefill"] for k in med}
    return {
        "prefill_tokens_per_s": prefill["model"],
        "reference_prefill_tokens_per_s": prefill["reference"],
        "decode_ms_per_token": 1000 * med["model"]["decode"],
        "reference_decode_ms_per_token": 1000 * med["reference"]["decode"],
        "prefill_speedup": prefill["model"] / prefill["reference"],
        "decode_speedup": med["reference"]["decode"] / med["model"]["decode"],
        "ideal_speedup": param_count(reference, compute_only=True) / param_count(model, compute_only=True),
    }
