"""Pruned checkpoints in stock Hugging Face tools: a non-uniform checkpoint ships its modeling code (auto_map), so
`from_pretrained(trust_remote_code=True)`, `pipeline()` and the stock lm-eval CLI load it; no stock class accepts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunebench.cli import main
from suite.model.compact import compact, load_pruned, save_pruned
from suite.model.masks import Masks
from suite.model.structures import build_structure
from suite.testing import tiny_model, tiny_text_model


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE: a private one per test."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _ragged(model, seed=0):
    """Compact `model` to random masks that keep a different share of every group (never a uniform layout)."""
    structure = build_structure(model, "query_head")
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in structure.groups:
        k = torch.rand(group.n_units, generator=g) > 0.4
        k[0] = True
        keep[group.name] = k
    compact(model, structure, Masks(keep, fingerprint=structure.fingerprint))
    return model


def test_every_family_loads_through_remote_code_with_load_pruned_logits(family, tmp_path):
    model = _ragged(tiny_model(family))
    save_pruned(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == f"prunebench_{family}" and "AutoModelForCausalLM" in config["auto_map"]
    heads = config["num_attention_heads"]
    assert isinstance(heads, list) and len(heads) == model.config.num_hidden_layers
    assert (tmp_path / "m" / "modeling_prunebench.py").is_file()
    ours = load_pruned(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        assert torch.equal(stock(ids).logits, expected)
    assert stock.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_a_stock_class_refuses_a_non_uniform_checkpoint_even_with_ignore_mismatched_sizes(tmp_path):
    from transformers import LlamaForCausalLM

    save_pruned(_ragged(tiny_model("llama")), tmp_path / "m")
    with pytest.raises(Exception, match=r"intermediate_size|num_attention_heads"):
        LlamaForCausalLM.from_pretrained(tmp_path / "m", ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=False)


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_non_uniform_methods_write_checkpoints_that_stock_tools_load(method, tmp_path, capsys):
    from transformers import pipeline

    dense = tiny_text_model(tmp_path / "dense")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(dense), "--method", method, "--sparsity", "0.4", "--out", str(out),
                 "--calib", "n=4", "--calib", "seq_len=32", "--calib", "valid_n=0"]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code=True" in printed  # prune says how to load what it wrote
    assert not json.loads((out / "model" / "config.json").read_text())["prunebench_layout"]["stock"]
    ours = load_pruned(out / "model")
    stock = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True).eval()
    ids = torch.randint(ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, stock(ids).logits)
    generate = pipeline("text-generation", model=str(out / "model"), trust_remote_code=True)
    assert generate("def f(x):", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("def f(x):")


def test_the_stock_lm_eval_cli_scores_a_non_uniform_checkpoint_as_prunebench_eval_does(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "zoo:tiny-llama", "--method", "wanda_sp", "--sparsity", "0.3", "--out", str(out),
                 "--calib", "n=8", "--calib", "seq_len=64", "--calib", "valid_n=0"]) == 0
    assert main(["tasks", "path"]) == 0
    include = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["eval", "--model", str(out / "model"), "--tasks", "pb_next_line,pb_return", "--limit", "40",
                 "--ppl", "embedded:test@64/2", "--json", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out / 'model'},trust_remote_code=True,dtype=float32", "--tasks", "pb_next_line,pb_return",
           "--include_path", include, "--limit", "40", "--device", "cpu", "--batch_size", "8",
           "--output_path", str(tmp_path / "lm_eval")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(result.read_text())["results"]
    for task in ("pb_next_line", "pb_return"):
        assert theirs[task]["acc,none"] == pytest.approx(ours[task]["acc"], abs=1e-9), task
        assert theirs[task]["acc_norm,none"] == pytest.approx(ours[task]["acc_norm"], abs=1e-9), task
