from __future__ import annotations

import json
import time

import pytest
import torch

from suite.data.calibration import calibration
from suite.data.sources import embedded_corpus, load_source, split_of
from suite.data.tasks import EMBEDDED_TASKS, task_dir
from suite.errors import DataError


def test_embedded_corpus_is_the_stdlib_without_tests_split_about_90_5_5():
    c = embedded_corpus()
    names = [d.name for s in ("train", "valid", "test") for d in c.documents(s)]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "site-packages")) or "/tests/" in n or "idle_test" in n for n in names)
    n = {s: len(c.documents(s)) for s in ("train", "valid", "test")}
    total = sum(n.values())
    assert 0.85 < n["train"] / total < 0.95 and 0.02 < n["test"] / total < 0.08
    for split in ("train", "valid", "test"):  # the split is a function of the path alone
        assert all(split_of(d.name) == split for d in c.documents(split))
    assert len(set(c.hashes.values())) == 3 and all(len(h) == 16 for h in c.hashes.values())


def test_local_folder_source_splits_by_path_and_hashes_content(tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i}.txt").write_text(f"text number {i}\n" * 20)
    src = load_source(str(tmp_path))
    assert sum(len(d) for d in src.splits.values()) == 60
    again = load_source(str(tmp_path))
    assert again.hashes == src.hashes
    (tmp_path / "doc0.txt").write_text("changed")
    assert load_source(str(tmp_path)).hashes[split_of("doc0.txt")] != src.hashes[split_of("doc0.txt")]


def test_unknown_and_offline_sources_fail_fast_with_one_line(monkeypatch):
    with pytest.raises(DataError, match="unknown text source 'nosuch'"):
        load_source("nosuch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_source("wikitext2")
    assert time.perf_counter() - start < 30
    assert "\n" not in str(err.value) and "wikitext2" in str(err.value)


def test_calibration_is_seeded_and_content_hashed():
    from suite.zoo import tokenizer

    tok = tokenizer()
    src = embedded_corpus()
    a = calibration(src, tok, n=4, seq_len=32, seed=0)
    b = calibration(src, tok, n=4, seq_len=32, seed=0)
    c = calibration(src, tok, n=4, seq_len=32, seed=1)
    assert a.input_ids.shape == (4, 32) and torch.equal(a.input_ids, b.input_ids)
    assert a.content_hash == b.content_hash != c.content_hash
    assert src.hashes["train"] in a.spec and "seed=0" in a.spec


def test_embedded_tasks_are_unambiguous_deterministic_and_from_the_test_split():
    root, _ = task_dir("test")
    test_files = {d.name for d in embedded_corpus().documents("test")}
    for task in EMBEDDED_TASKS:
        items = [json.loads(line) for line in (root / f"{task}.jsonl").read_text().splitlines()]
        assert len(items) >= 500
        for item in items:
            choices = item["choices"]
            assert len(choices) == 4 and len({c.strip() for c in choices}) == 4
            assert 0 <= item["label"] < 4
            assert item["source"].rsplit(":", 1)[0] in test_files
        labels = [it["label"] for it in items]
        assert max(labels.count(k) for k in range(4)) < 0.35 * len(items)  # answers are not positional
    from suite.data.tasks import generate

    again = generate("pb_return", embedded_corpus(), "test")
    first = [json.loads(line) for line in (root / "pb_return.jsonl").read_text().splitlines()]
    assert again == first
