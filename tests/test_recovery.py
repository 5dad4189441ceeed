"""Recovery fine-tuning: LoRA merged back into compact models of every family, full and distill training, the run's
two stages, its identity, and the refusals of bad settings."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from prunebench.cli import main
from suite.errors import NumericalError
from suite.methods.pruner import get_method
from suite.model.compact import load_pruned, save_pruned
from suite.model.masks import Target
from suite.model.modules import RepeatedHeadsLinear
from suite.recovery.spec import RecoverySpec
from suite.recovery.train import attach_lora, recover
from suite.run.config import load_experiment
from suite.run.grid import expand
from suite.run.pipeline import prune_model
from suite.run.tracking import Tracker
from suite.testing import VOCAB, tiny_experiment, tiny_model, tiny_text_model


def _pruned(family: str, method: str = "random", granularity: str = "query_head", **target):
    model = tiny_model(family)
    prune_model(model, get_method(method)(), Target(**{"sparsity": 0.4} | target), granularity=granularity)
    return model


def _windows(n: int = 16, seq_len: int = 24) -> torch.Tensor:
    """Learnable text: counting sequences from random starts (each next token is the previous + 1)."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
    return (starts + torch.arange(seq_len)) % VOCAB


@pytest.mark.parametrize("case", ["llama uniform", "qwen3 repeated K/V heads", "qwen3_moe fused and ragged experts"])
def test_a_merged_lora_checkpoint_reloads_with_the_peft_models_logits(case, tmp_path):
    """Adapters with non-zero updates on every projection (RepeatedHeadsLinear and expert weights included): the
    merged model computes what the peft model computed, saves, and reloads to the same logits: through stock
    `from_pretrained` when its widths are uniform, through `load_pruned` otherwise."""
    from transformers import AutoModelForCausalLM

    family, method, granularity = {"llama uniform": ("llama", "magnitude", "kv_group"),
                                   "qwen3 repeated K/V heads": ("qwen3", "random", "query_head"),
                                   "qwen3_moe fused and ragged experts": ("qwen3_moe", "random", "kv_group")}[case]
    uniform = {"sparsity": 0.5, "uniform": True, "round_to": 8} if case == "llama uniform" else {}
    model = _pruned(family, method, granularity, **uniform)
    stock = model.config.prunebench_layout["stock"]
    assert stock == (case == "llama uniform")
    if case == "qwen3 repeated K/V heads":
        assert any(isinstance(m, RepeatedHeadsLinear) for m in model.modules())
    wrapped = attach_lora(model, RecoverySpec(dropout=0.0))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    probe = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = wrapped(input_ids=probe).logits
        merged = wrapped.merge_and_unload()
        assert merged is model
        assert (merged(input_ids=probe).logits - adapted).abs().max() < 1e-4
    save_pruned(merged, tmp_path / "m")
    if stock:
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    else:
        reloaded = load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert (reloaded.eval()(input_ids=probe).logits - adapted).abs().max() < 1e-4


def test_recovery_lowers_the_training_loss_on_every_family(family):
    """LoRA on each family's tiny config, compacted to non-uniform widths first: the loss on the training windows
    falls, the adapters are gone afterwards and the weights changed."""
    model = _pruned(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = RecoverySpec(steps=12, lr=1e-2, batch_size=4, seq_len=24)  # dropout 0.05 (none on fused experts)
    result = recover(model, _windows(), spec, seed=0, progress=False)
    assert result.loss_after < result.loss_before - 0.1, (result.loss_before, result.loss_after)
    assert len(result.curves["loss"]) == 12 and result.tokens == 12 * 4 * 24
    assert not any("lora" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(before)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("settings", [{"method": "full", "lr": 1e-3},
                                      {"method": "distill", "lr": 1e-2, "lm_weight": 0.5},
                                      {"method": "distill", "lr": 1e-3, "distill_weights": "full",
                                       "temperature": 2.0}])
def test_full_and_distill_recovery_lower_their_loss(settings):
    """Full fine-tuning lowers the LM loss; distillation from the dense model lowers its KL (the distill curve), and
    the dense teacher is left as it was."""
    teacher = tiny_model("llama")
    model = _pruned("llama")
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = RecoverySpec(steps=12, batch_size=4, seq_len=24, **settings)
    result = recover(model, _windows(), spec, seed=0, teacher=teacher, progress=False)
    curve = result.curves["kl" if spec.method == "distill" else "loss"]
    assert sum(curve[-3:]) < sum(curve[:3]), curve
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in reference.items())
    assert all(p.requires_grad for p in model.parameters())  # flags as they were before recovery


def test_recovery_is_seeded_and_its_nan_guard_is_one_line():
    """The same seed gives the same weights; a diverging recovery stops with one line naming the step and lr."""
    a, b = _pruned("qwen3"), _pruned("qwen3")
    spec = RecoverySpec(steps=3, lr=1e-2, batch_size=4, seq_len=24)
    recover(a, _windows(), spec, seed=3, progress=False)
    recover(b, _windows(), spec, seed=3, progress=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(NumericalError) as err:
        recover(_pruned("llama"), _windows(), RecoverySpec(method="full", steps=50, lr=1e9, batch_size=4,
                                                           seq_len=24, max_grad_norm=1e9), progress=False)
    assert "\n" not in str(err.value) and "recovery diverged" in str(err.value) and "lr 1e+09" in str(err.value)
    model = _pruned("llama")
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NumericalError):  # LoRA diverging: its adapters are dropped, never merged
        recover(model, _windows(), RecoverySpec(steps=50, lr=1e9, batch_size=4, seq_len=24, max_grad_norm=1e9),
                progress=False)
    assert set(model.state_dict()) == set(pruned)
    assert all(torch.equal(v, pruned[k]) for k, v in model.state_dict().items())


def test_the_recovery_spec_changes_the_run_identity_but_not_the_pruning(text_model, tmp_path):
    path = tiny_experiment(tmp_path, text_model, methods=[{"name": "random"}])
    plain = expand(load_experiment(path), tmp_path)[0]
    lora = expand(load_experiment(path, ["recovery.steps=5"]), tmp_path)[0]
    longer = expand(load_experiment(path, ["recovery.steps=6"]), tmp_path)[0]
    other_data = expand(load_experiment(path, ["recovery.steps=5", "recovery.data.n=7"]), tmp_path)[0]
    identities = {s.identity("fp") for s in (plain, lora, longer, other_data)}
    assert len(identities) == 4
    assert len({s.pruning_identity("fp") for s in (plain, lora, longer, other_data)}) == 1
    assert lora.recovery["data"]["split_hash"] and lora.recovery["data"]["source"] == "embedded"


BAD = {
    "unknown key": ("recovery.bogus=1", "recovery.bogus: unknown key"),
    "unknown method": ("recovery.method=qlora", "recovery.method"),
    "zero steps": ("recovery.steps=0", "recovery.steps"),
    "unknown projection": ("recovery.target_modules=[qkv_proj]", "recovery.target_modules.0"),
    "test split": ("recovery.data.split=test", "recovery.data.split: the test split is reserved"),
    "no such split": ("recovery.data.split=dev", "recovery.data.split: embedded has no split 'dev'"),
    "a distill setting without distill": ("recovery.temperature=2", "recovery.temperature: only applies"),
    "micro-batches": ("recovery.micro_batch_size=3", "recovery.micro_batch_size: 3 does not divide"),
}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("recovery") / "tiny")


@pytest.mark.parametrize("case", BAD)
def test_a_bad_recovery_setting_is_one_error_line_before_any_write(case, text_model, tmp_path, capsys):
    override, message = BAD[case]
    model = text_model
    path = tiny_experiment(tmp_path, model, methods=[{"name": "random"}])
    for command in ("validate", "run"):
        assert main([command, str(path), "--workdir", str(tmp_path / "w"), "--set", override]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "w").exists()
    # the same setting on `recover` (keys without the `recovery.` prefix), before anything is loaded or written
    assert main(["recover", "--model", str(model), "--out", str(tmp_path / "r"),
                 "--set", override.removeprefix("recovery.")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_recovery_on_evaluation_data_is_refused(text_model, tmp_path, capsys):
    path = tiny_experiment(tmp_path, text_model, methods=[{"name": "random"}],
                           evaluation={"ppl": ["embedded:valid@128/8"], "tasks": []},
                           recovery={"data": {"split": "valid"}})
    assert main(["validate", str(path), "--workdir", str(tmp_path / "w")]) == 2
    assert "error: recovery.data: embedded:valid is evaluation data" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_records_both_stages_and_reports_them_side_by_side(text_model, tmp_path, capsys):
    """A sweep with a LoRA stage: every run has pruned.* and recovered.* numbers, recovery.* params, the recovery
    curves and its record; the report puts w/o tune and w/ tune side by side; the leaderboard ranks the stage it is
    asked for and says which. A second stage on the same store reuses the prunings."""
    model = text_model
    recovery = {"steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "data": {"n": 8}}
    path = tiny_experiment(tmp_path, model, methods=[{"name": "random"}, {"name": "wanda_sp"}], recovery=recovery)
    workdir = tmp_path / "w"
    assert main(["run", str(path), "--workdir", str(workdir)]) == 0
    assert "tuned_mean_acc" in capsys.readouterr().out
    tracker = Tracker(workdir, "unit")
    runs = [r for r in tracker.client.search_runs([tracker.experiment_id])
            if r.data.tags.get("prunebench.kind") == "pruned"]
    assert len(runs) == 2
    for run in runs:
        m, p = run.data.metrics, run.data.params
        for stage in ("pruned", "recovered"):
            assert f"{stage}.mean_acc" in m and f"{stage}.retained.mean_acc" in m
            assert any(k.startswith(f"{stage}.ppl.") for k in m)
        assert "mean_acc" not in m  # no plain name leaves the stage open
        assert m["recovery_tokens"] == 3 * 2 * 32 and m["recovery_seconds"] > 0
        assert p["recovery.steps"] == "3" and p["recovery.data.split"] == "train" and p["recovery.data_hash"]
        assert json.loads(run.data.tags["prunebench.recovery"])["steps"] == 3
        history = tracker.client.get_metric_history(run.info.run_id, "curve.recovery_loss")
        assert len(history) == 3
        stored = tracker.artifact_dir(run.info.artifact_uri)
        assert json.loads((stored / "recovery.json").read_text())["spec"]["steps"] == 3
    assert main(["report", "--experiment", "unit", "--workdir", str(workdir), "--out", str(tmp_path / "rep")]) == 0
    tables = list((tmp_path / "rep" / "tables").glob("*_recovery.md"))
    assert len(tables) == 1
    assert len(list((tmp_path / "rep" / "figures").glob("*_recovery.png"))) == 1  # the recovery curves
    text = tables[0].read_text()
    assert text.index("random (w/o tune)") < text.index("random (w/ tune)") < text.index("wanda_sp (w/o tune)")
    # each stage's row reads that stage's own stored item scores: its perplexity is the run's, stage by stage
    rows = pd.read_csv(tables[0].with_suffix(".csv")).set_index("method")
    column = next(c for c in rows.columns if c.startswith("ppl.") and c.count(".") == 1)
    for run in runs:
        label, m = run.data.params["label"], run.data.metrics
        for stage, words in (("pruned", "w/o tune"), ("recovered", "w/ tune")):
            assert rows.loc[f"{label} ({words})", column] == pytest.approx(m[f"{stage}.{column}"], rel=1e-9)
    for stage, words in (("pruned", "w/o tune"), ("recovered", "w/ tune")):
        out = tmp_path / f"board_{stage}"
        assert main(["leaderboard", "--experiment", "unit", "--workdir", str(workdir), "--out", str(out),
                     "--stage", stage]) == 0
        board = json.loads((out / "leaderboard.json").read_text())
        assert board["stage"] == stage and words in (out / "index.html").read_text()
    # another recovery stage on the same store: the prunings are reused, the w/o tune numbers are the same
    assert main(["run", str(path), "--workdir", str(workdir), "--set", "recovery.steps=4"]) == 0
    runs = [r for r in tracker.client.search_runs([tracker.experiment_id])
            if r.data.tags.get("prunebench.kind") == "pruned"]
    assert len(runs) == 4
    by_method: dict[str, list] = {}
    for run in runs:
        by_method.setdefault(run.data.params["label"], []).append(run.data.metrics)
    for metrics in by_method.values():
        assert metrics[0]["pruned.mean_acc"] == metrics[1]["pruned.mean_acc"]
    boards = {}
    for stage in ("pruned", "recovered"):
        out = tmp_path / f"again_{stage}"
        assert main(["leaderboard", "--experiment", "unit", "--workdir", str(workdir), "--out", str(out),
                     "--stage", stage]) == 0
        boards[stage] = json.loads((out / "leaderboard.json").read_text())
    # one pruned model per method, measured once however many recoveries followed; two recoveries, two boards
    assert boards["pruned"]["runs"] == 2 and boards["pruned"]["duplicates_counted_once"] == 2
    assert len(boards["recovered"]["boards"]) == 2
    assert "recovery steps" in boards["recovered"]["boards"][1]["differs_from_board_1"]
    assert main(["report", "--experiment", "unit", "--workdir", str(workdir), "--out", str(tmp_path / "rep2"),
                 "--stage", "recovered"]) == 0

    shown = set(pd.read_csv(tmp_path / "rep2" / "results.csv")["method"])  # two stages under one label: told apart
    assert any("[recovery=" in m for m in shown), shown


@pytest.mark.slow
def test_recover_command_writes_a_merged_checkpoint_with_both_stages(text_model, tmp_path, capsys):
    """`prunebench recover` on a `prune` output: numbers before and after, a checkpoint that reloads, the teacher
    of distill taken from the prune output."""
    assert main(["prune", "--model", str(text_model), "--method", "wanda_sp", "--sparsity", "0.4", "--calib", "n=4",
                 "--calib", "seq_len=32", "--calib", "valid_n=0", "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    args = ["recover", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "r"), "--ppl", "embedded:test@64/4",
            "--tasks", "pb_next_line", "--limit", "4", "--set", "steps=3", "--set", "batch_size=2", "--set",
            "seq_len=32", "--set", "data.n=8", "--set", "method=distill"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "w/o tune" in out and "w/ tune" in out and "training loss" in out
    record = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert record["recovery"]["method"] == "distill" and record["recovery"]["data"]["source"] == "embedded"
    assert {"pruned.mean_acc", "recovered.mean_acc", "recovery_loss_after"} <= set(record["metrics"])
    reloaded = load_pruned(tmp_path / "r" / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in load_pruned(tmp_path / "p" / "model").parameters())
    assert main(args) == 0  # an earlier recover output is replaced; a prune output is not
    args[args.index("--out") + 1] = str(tmp_path / "p")
    assert main(args) == 2
