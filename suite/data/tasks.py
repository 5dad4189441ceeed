"""Embedded multiple-choice tasks generated from a split of the embedded corpus, written as lm-eval task YAML +
jsonl and loaded with `TaskManager(include_path=..., include_defaults=False)`.

Three tasks, each item with 4 distinct candidates drawn from the same file (so style cannot give the answer away):
- `pb_next_line`: the true next line after up to 10 lines of context; distractors are lines of similar length.
- `pb_self_attr`: complete `self.` with the attribute the code really uses; distractors are other attributes
  the same file uses (identifier-level understanding).
- `pb_return`: the function's real `return` statement, given its body so far; distractors are other returns of the
  same file (all syntactically alike, so only the function's semantics tell them apart).
Evaluation uses the test split; `margin_set` builds calibration sequences from the train split for methods that
calibrate on task data (GISP's margin objective), never from the test items.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from suite.atomic import locked, replacing_dir
from suite.data.sources import Document, TextSource, cache_dir, embedded_corpus
from suite.errors import DataError
from suite.hashing import digest

TASK_VERSION = 1
N_ITEMS = 500
CONTEXT_LINES = 10
CONTEXT_CHARS = 700
Item = dict[str, object]


def _context(lines: list[str], end: int, start: int = 0) -> str:
    """Up to CONTEXT_LINES lines before `end` (not before `start`), at most CONTEXT_CHARS, ending in a newline."""
    picked: list[str] = []
    for line in reversed(lines[max(start, end - CONTEXT_LINES) : end]):
        if sum(len(x) + 1 for x in picked) + len(line) + 1 > CONTEXT_CHARS:
            break
        picked.append(line)
    return "".join(x + "\n" for x in reversed(picked))


def _pick(rng: random.Random, true: str, pool: list[str], similar: Callable[[str], bool]) -> list[str] | None:
    """3 distractors from `pool`, distinct from the answer and each other (after stripping), similar if possible."""
    seen = {true.strip()}
    candidates = [p for p in dict.fromkeys(pool) if p.strip() not in seen]
    rng.shuffle(candidates)
    candidates.sort(key=lambda p: not similar(p))  # similar ones first, random order within
    out: list[str] = []
    for p in candidates:
        if p.strip() not in seen:
            out.append(p)
            seen.add(p.strip())
        if len(out) == 3:
            return out
    return None


def _item(rng: random.Random, question: str, true: str, distractors: list[str], source: str) -> Item:
    choices = [true, *distractors]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "label": choices.index(true), "source": source}


def _lengthwise(true: str) -> Callable[[str], bool]:
    n = len(true.strip())
    return lambda s: 0.5 * n <= len(s.strip()) <= 2 * n


def _substantive(line: str) -> bool:
    return len(line.strip()) >= 12


def next_line_items(doc: Document, rng: random.Random) -> Iterator[Item]:
    lines = doc.text.splitlines()
    pool = [x for x in lines if _substantive(x)]
    for i in range(3, len(lines)):
        if _substantive(lines[i]):
            distractors = _pick(rng, lines[i], pool, _lengthwise(lines[i]))
            if distractors:
                yield _item(rng, _context(lines, i), lines[i], distractors, f"{doc.name}:{i + 1}")


_SELF_ATTR = re.compile(r"\bself\.([A-Za-z_]\w*)")


def self_attr_items(doc: Document, rng: random.Random) -> Iterator[Item]:
    lines = doc.text.splitlines()
    pool = sorted(set(_SELF_ATTR.findall(doc.text)))
    for i, line in enumerate(lines):
        for m in _SELF_ATTR.finditer(line):
            distractors = _pick(rng, m.group(1), pool, lambda s: True)
            if distractors:
                question = _context(lines, i) + line[: m.start(1)]
                yield _item(rng, question, m.group(1), distractors, f"{doc.name}:{i + 1}")


def return_items(doc: Document, rng: random.Random) -> Iterator[Item]:
    try:
        tree = ast.parse(doc.text)
    except SyntaxError:
        return
    lines = doc.text.splitlines()
    returns: list[tuple[int, int]] = []  # (line index of the return, line index of its function's def)
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and node.value is not None and node.lineno == node.end_lineno:
                    returns.append((node.lineno - 1, fn.lineno - 1))
    pool = [lines[r] for r, _ in returns if len(lines[r].strip()) >= 8]
    for r, start in sorted(set(returns)):
        if r > start and len(lines[r].strip()) >= 8:  # `return x` and longer
            distractors = _pick(rng, lines[r], pool, _lengthwise(lines[r]))
            if distractors:
                yield _item(rng, _context(lines, r, start), lines[r], distractors, f"{doc.name}:{r + 1}")


GENERATORS: dict[str, Callable[[Document, random.Random], Iterator[Item]]] = {
    "pb_next_line": next_line_items,
    "pb_self_attr": self_attr_items,
    "pb_return": return_items,
}
EMBEDDED_TASKS = tuple(GENERATORS)


def generate(task: str, source: TextSource, split: str, n_items: int = N_ITEMS) -> list[Item]:
    """n_items items spread over the split, chosen with a seed derived from the task name (deterministic)."""
    rng = random.Random(f"{task}:{split}")
    items = [item for doc in source.documents(split) for item in GENERATORS[task](doc, rng)]
    if len(items) < n_items:
        raise DataError(f"{task}: only {len(items)} items in {source.name}:{split}, need {n_items}")
    rng.shuffle(items)
    return sorted(items[:n_items], key=lambda it: str(it["source"]))


_YAML = """task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: {version}}}
"""


def task_dir(split: str = "test") -> tuple[Path, dict[str, str]]:
    """Write (once) the embedded tasks of a split; returns the include dir and each task's data hash."""
    source = embedded_corpus()
    suffix = "" if split == "test" else f"_{split}"
    root = cache_dir() / "tasks" / f"{split}-{source.hashes[split]}-v{TASK_VERSION}"
    manifest = root / "manifest.json"
    if manifest.is_file():
        return root, json.loads(manifest.read_text())
    with locked(root.with_name(root.name + ".lock")):  # concurrent workers: one writes, the others read it
        if manifest.is_file():
            return root, json.loads(manifest.read_text())
        hashes = {}
        with replacing_dir(root) as tmp:
            for task in EMBEDDED_TASKS:
                name = task + suffix
                lines = "".join(json.dumps(item, sort_keys=True) + "\n" for item in generate(task, source, split))
                (tmp / f"{name}.jsonl").write_text(lines)
                hashes[name] = digest(lines)
                data = (root / f"{name}.jsonl").resolve()
                (tmp / f"{name}.yaml").write_text(_YAML.format(task=name, data=data, version=TASK_VERSION))
            (tmp / "manifest.json").write_text(json.dumps(hashes, indent=1, sort_keys=True))
    return root, hashes


def sample_items(task: str, source: TextSource, split: str, n_items: int, per_doc: int = 4) -> list[Item]:
    """n_items items from at most `per_doc` per document, documents visited in a seeded order until enough: cheap
    for a large split (generating every item of the train split takes minutes) and spread over many files."""
    rng = random.Random(f"{task}:{split}:sample")
    docs = list(source.documents(split))
    rng.shuffle(docs)
    items: list[Item] = []
    for doc in docs:
        found = list(GENERATORS[task](doc, rng))
        items.extend(rng.sample(found, min(per_doc, len(found))))
        if len(items) >= n_items:
            return items[:n_items]
    raise DataError(f"{task}: only {len(items)} items in {source.name}:{split}, need {n_items}")


def margin_set(tokenizer: Any, tasks: list[str], n_items: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Every choice of `n_items` train-split items per task as one sequence (question + choice, cut from the left
    to `seq_len` tokens, right-padded), with signed per-position weights on the choice's predicted tokens:
    +1/n_correct for the right answer, -1/n_wrong for the others. sum(weights * token NLL) is then GISP's margin
    loss, mean NLL(correct answer) - mean NLL(wrong answer), the sum over answer tokens being lm-eval's `acc` score.
    Returns (ids [m, seq_len], weights [m, seq_len - 1] over positions 1..seq_len-1)."""
    unknown = sorted(set(tasks) - set(EMBEDDED_TASKS))
    if unknown:
        raise DataError(f"calibration.tasks: {', '.join(unknown)} has no train split here; embedded tasks: "
                        f"{', '.join(EMBEDDED_TASKS)}")
    source = embedded_corpus()
    rows: list[tuple[list[int], int, bool]] = []  # (ids, answer length, correct)
    for task in tasks:
        for item in sample_items(task, source, "train", n_items):
            question = str(item["question"])
            context = tokenizer(question, add_special_tokens=False)["input_ids"]
            for k, choice in enumerate(item["choices"]):  # type: ignore[arg-type]
                whole = tokenizer(question + choice, add_special_tokens=False)["input_ids"]
                answer = len(whole) - len(context)  # lm-eval's split: the continuation is what the context lacks
                if answer < 1 or answer >= seq_len:
                    continue
                rows.append((whole[-seq_len:], answer, k == item["label"]))
    n_correct = sum(correct for _, _, correct in rows)
    n_wrong = len(rows) - n_correct
    if not n_correct or not n_wrong:
        raise DataError(f"calibration.tasks: no usable items at seq_len {seq_len}")
    ids = torch.full((len(rows), seq_len), tokenizer.pad_token_id or 0, dtype=torch.int64)
    weights = torch.zeros(len(rows), seq_len - 1)
    for r, (seq, answer, correct) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        weights[r, len(seq) - 1 - answer : len(seq) - 1] = 1 / n_correct if correct else -1 / n_wrong
    return ids, weights
