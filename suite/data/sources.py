"""Text sources: the embedded corpus, local text, HF data sets; every split with a content hash.

The embedded corpus is the running interpreter's standard-library source: real text that nobody here wrote and
that every machine with Python has, split deterministically into train/valid/test by a hash of each file's
relative path. Local text files or folders split the same way; HF data sets (`wikitext2`, `c4`, `ptb`) load by
name when the hub is reachable and fail in seconds with one line when not. Every split and every calibration
batch carries a content hash, so two runs can prove they saw the same data.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from suite.atomic import replacing_file
from suite.errors import DataError, did_you_mean
from suite.hashing import digest
from suite.hub import environ, hub_unreachable_reason, offline
from suite.registry import Registry

SPLITS = ("train", "valid", "test")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                           "pydoc_data"})  # pydoc_data is one generated 700 kB dict of help text, not code
TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".tex"})
# name -> (load_dataset args, kwargs, {our split: their split})
HF_DATASETS: Registry[tuple[tuple[str, ...], dict[str, Any], dict[str, str]]] = Registry("text source", DataError)
for _name, _entry in {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, {"train": "train", "valid": "validation", "test": "test"}),
    "ptb": (("ptb_text_only", "penn_treebank"), {},
            {"train": "train", "valid": "validation", "test": "test"}),
    "c4": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz",  # Wanda/LLM-Pruner shards
                                            "validation": "en/c4-validation.00000-of-00008.json.gz"}},
           {"train": "train", "valid": "validation", "test": "validation"}),
}.items():
    HF_DATASETS.add(_name, _entry)


def cache_dir() -> Path:
    """Where derived data (token ids, task files, training checkpoints) is cached: $PRUNEBENCH_CACHE."""
    return Path(os.environ.get("PRUNEBENCH_CACHE", Path.home() / ".cache" / "prunebench"))


def split_of(relative_path: str) -> str:
    """Deterministic ~90/5/5 split by a hash of the file's relative path (stable across machines)."""
    bucket = int(digest(relative_path, length=8), 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class TextSource:
    """Documents per split, with a content hash per split."""

    name: str
    splits: dict[str, tuple[Document, ...]]
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_documents(cls, name: str, splits: dict[str, list[Document]]) -> TextSource:
        docs = {s: tuple(sorted(d, key=lambda doc: doc.name)) for s, d in splits.items()}
        hashes = {}
        for split, items in docs.items():
            h = hashlib.sha256()
            for doc in items:
                h.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
            hashes[split] = h.hexdigest()[:16]
        return cls(name, docs, hashes)

    def documents(self, split: str) -> tuple[Document, ...]:
        if split not in self.splits or not self.splits[split]:
            have = ", ".join(s for s, d in self.splits.items() if d)
            raise DataError(f"text source {self.name!r} has no {split!r} split (has: {have})")
        return self.splits[split]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def embedded_corpus() -> TextSource:
    """The interpreter's standard-library `.py` sources, without test suites or site-packages."""
    root = stdlib_root()
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        splits[split_of(rel.as_posix())].append(Document(rel.as_posix(), text))
    if not splits["train"]:
        raise DataError(f"no standard-library sources found under {root}")
    return TextSource.from_documents("embedded", splits)


def local_source(path: Path) -> TextSource:
    """A text file (all three splits see it: use it for calibration or evaluation, not both) or a folder."""
    if path.is_file():
        doc = [Document(path.name, path.read_text(encoding="utf-8", errors="replace"))]
        return TextSource.from_documents(f"file:{path}", {s: doc for s in SPLITS})
    if not path.is_dir():
        raise DataError(f"text source {path} does not exist")
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in TEXT_SUFFIXES:
            rel = p.relative_to(path).as_posix()
            splits[split_of(rel)].append(Document(rel, p.read_text(encoding="utf-8", errors="replace")))
    if not any(splits.values()):
        raise DataError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
    return TextSource.from_documents(f"dir:{path}", splits)


def hf_source(name: str) -> TextSource:
    """A hub data set by name; each split joined with blank lines (the LLM-Pruner/SparseGPT convention)."""
    import datasets

    args, kwargs, split_map = HF_DATASETS[name]
    reason = hub_unreachable_reason()
    datasets.disable_progress_bars()
    try:
        if reason is None:
            loaded = datasets.load_dataset(*args, **kwargs)
        else:
            with offline(), environ(HF_DATASETS_OFFLINE="1"):
                loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many unrelated types for "not cached" / "not reachable"
        why = reason or str(err).splitlines()[0]
        raise DataError(f"cannot load data set {name!r} from the Hugging Face hub: {why}") from None
    key = "text" if name != "ptb" else "sentence"
    splits = {ours: [Document(f"{name}/{theirs}", "\n\n".join(loaded[theirs][key]))]
              for ours, theirs in split_map.items()}
    return TextSource.from_documents(name, splits)


def load_source(spec: str) -> TextSource:
    """`embedded`, a hub data set name (wikitext2, c4, ptb), or a local file/folder path."""
    if spec == "embedded":
        return embedded_corpus()
    if spec in HF_DATASETS:
        return hf_source(spec)
    path = Path(spec.removeprefix("file:")).expanduser()
    if path.exists():
        return local_source(path)
    raise DataError(f"unknown text source {spec!r}{did_you_mean(spec, ['embedded', *HF_DATASETS])}: not 'embedded', "
                    f"{', '.join(HF_DATASETS)}, or an existing path")


def tokenizer_hash(tokenizer: Any) -> str:
    return digest(tokenizer.backend_tokenizer.to_str())


def token_stream(source: TextSource, split: str, tokenizer: Any) -> Tensor:
    """All documents of a split as one id stream [N], EOS between documents; cached on disk per content hash."""
    docs = source.documents(split)
    key = f"{source.hashes[split]}-{tokenizer_hash(tokenizer)}"
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for piece in encoded:
        ids.extend(piece)
        if eos is not None:
            ids.append(eos)
    array = np.asarray(ids, dtype=np.int32)
    with replacing_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return torch.from_numpy(array.astype(np.int64))
