"""Scale: memory discipline (one decoder layer at a time for layer-wise methods; checkpointing and autocast for mask
learners), device-agnostic commands (tested on the CPU: no test needs a GPU), and the scale bench's measurements and
formulas on a tiny stand-in for the real dimensions."""

from __future__ import annotations

import contextlib

import pytest
import torch

from prunebench.cli import main
from suite import scale
from suite.data.calibration import Calibration
from suite.methods import capture
from suite.methods.pruner import get_method, methods
from suite.model.masks import Target
from suite.run.pipeline import prune_model
from suite.testing import tiny_model, tiny_text_model

LAYERWISE = [name for name, cls in methods().items() if cls.offloads]


def _calibration(vocab: int = 128, n: int = 8, seq_len: int = 32) -> Calibration:
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return Calibration.from_ids(ids, f"random:n={n}")


def test_the_layerwise_methods_are_the_decoder_walkers():
    assert set(LAYERWISE) == {"wanda_sp", "flap", "slimgpt"}


@pytest.mark.parametrize("method", LAYERWISE)
def test_a_layerwise_method_holds_one_decoder_layer_at_a_time_on_the_compute_device(method, monkeypatch):
    """Every layer goes to the compute device once, alone, in order; the result is the in-place one."""
    held, visits, peak = [], [], [0]
    real = capture.on_device

    @contextlib.contextmanager
    def watched(module, device):
        held.append(module)
        visits.append(module)
        peak[0] = max(peak[0], len(held))
        assert device == torch.device("cpu")
        with real(module, device):
            yield module
        held.remove(module)

    reference = tiny_model("llama")
    expected = prune_model(reference, get_method(method)(), Target(sparsity=0.5), calibration=_calibration())
    monkeypatch.setattr(capture, "on_device", watched)
    model = tiny_model("llama")
    pruner = get_method(method)()
    outcome = prune_model(model, pruner, Target(sparsity=0.5), calibration=_calibration(), device="cpu")
    assert pruner.device == torch.device("cpu")
    assert peak[0] == 1 and visits == list(model.model.layers)
    assert {k: v.tolist() for k, v in outcome.result.masks.keep.items()} == \
        {k: v.tolist() for k, v in expected.result.masks.keep.items()}


def test_on_device_leaves_a_module_where_it_was():
    layer = torch.nn.Linear(4, 4)
    with capture.on_device(layer, torch.device("cpu")) as held:
        assert held is layer
    assert layer.weight.device == torch.device("cpu")


@pytest.mark.parametrize("method", ["ddp", "hard_concrete", "maskprune"])
def test_gradient_checkpointing_learns_the_same_masks_and_autocast_meets_the_target(method):
    def run(**overrides):
        cls = get_method(method)
        pruner = cls(cls.Config(**(cls.quick | {"steps": 6} | overrides)))
        return prune_model(tiny_model("llama"), pruner, Target(sparsity=0.5), calibration=_calibration(n=16))

    plain, checkpointed = run(), run(gradient_checkpointing=True)
    assert checkpointed.result.curves["loss"] == pytest.approx(plain.result.curves["loss"], rel=1e-6)
    assert all(torch.equal(plain.result.masks.keep[k], checkpointed.result.masks.keep[k])
               for k in plain.result.masks.keep)
    bf16 = run(autocast="bfloat16")
    assert abs(bf16.metrics["sparsity"] - 0.5) < 0.02
    assert bf16.result.curves["loss"] != plain.result.curves["loss"]  # the forward really ran in bfloat16


def test_checkpointing_leaves_no_wrapper_behind():
    from suite.methods.mask_learning import checkpointed

    model = tiny_model("llama")
    with checkpointed(model):
        assert all("forward" in vars(layer) for layer in model.model.layers)
    assert not any("forward" in vars(layer) for layer in model.model.layers)


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("argv", [
    ["inspect", "--model", "zoo:tiny-llama", "--device", "cuda"],
    ["prune", "--model", "zoo:tiny-llama", "--method", "random", "--sparsity", "0.5", "--device", "cuda:3",
     "--out", "OUT"],
    ["eval", "--model", "zoo:tiny-llama", "--device", "tpu"],
    ["bench", "speed", "--device", "cuda"],
    ["bench", "speed", "--dtype", "bfloat16"],
    ["validate", "configs/quickstart.yaml", "--device", "cuda"],
])
def test_a_device_this_machine_lacks_is_one_error_line(argv, capsys, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    line = _one_line(capsys, main(argv))
    assert "device" in line or "dtype" in line
    assert not (tmp_path / "out").exists()


def test_every_command_runs_on_the_cpu_device_and_auto(tmp_path, capsys):
    model = tiny_text_model(tmp_path / "tiny")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model), "--method", "wanda_sp", "--sparsity", "0.5", "--device", "cpu",
                 "--calib", "n=4", "--calib", "seq_len=32", "--out", str(out)]) == 0
    for device in ("cpu", "auto"):
        assert main(["eval", "--model", str(out / "model"), "--device", device, "--dtype", "bfloat16",
                     "--ppl", "embedded:test@64/2", "--tasks", ""]) == 0
    assert "ppl embedded:test@64/2" in capsys.readouterr().out
    assert main(["inspect", "--model", str(model), "--device", "auto"]) == 0


def test_peak_memory_sees_a_known_allocation():
    with scale.PeakMemory(tensors=True) as mem:
        block = torch.ones(25_000_000)  # 100 MB
        del block
    assert 100e6 <= mem.tensors < 110e6
    assert mem.rss >= 90e6  # the pages were touched


@pytest.fixture
def tiny_scale(monkeypatch):
    """A tiny stand-in for the real dimensions, 4 'real' layers and a 1000-token 'real' vocabulary."""
    monkeypatch.setitem(scale.SCALE_MODELS, "tiny", {
        "model_type": "llama", "layers": 4, "vocab": 1000,
        "config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 16, "tie_word_embeddings": False}})
    monkeypatch.setattr(scale, "SCALE_VOCAB", 256)
    return "tiny"


def test_a_scale_cell_measures_and_extrapolates_by_its_formulas(tiny_scale):
    layerwise = scale.scale_cell(tiny_scale, "wanda_sp", 1, dtype="float32", seq_len=64)
    learner = scale.scale_cell(tiny_scale, "ddp", 1, dtype="float32", seq_len=64)
    for cell in (layerwise, learner):
        assert cell["tensor_bytes"] > 0 and cell["layer_bytes"] > 0 and cell["seconds"] > 0
    layer = layerwise["layer_bytes"]
    rest = (2 * 1000 * 64 + 64) * 4
    e = scale.extrapolate(layerwise)
    assert e.layers == 4 and e.device_bytes == layer + layerwise["tensor_bytes"] and e.host_bytes == 4 * layer + rest
    assert e.seconds == pytest.approx(4 * layerwise["seconds"])
    # the mask learner ran 2 steps of 1 sequence: its training time scaled to steps x batch_size
    assert learner["scaled_seconds"] > learner["seconds"] * 10
    e = scale.extrapolate(learner)
    logits = lambda v: 64 * v * 4 * 2  # one sequence's fp32 logits and their gradient  # noqa: E731
    assert e.device_bytes == pytest.approx(4 * layer + rest + 4 * (learner["tensor_bytes"] - logits(256))
                                           + logits(1000))
    assert e.fits(1) and not scale.Estimate("m", "x", 1, 0, 700e9, 0, "").fits(8)
    # a depth-2 cell replaces the bound by the measured slope: no growth here, so the state is counted once
    flat = scale.extrapolate(learner, two=learner)
    assert flat.basis == "slope" and flat.device_bytes == pytest.approx(
        4 * layer + rest + learner["tensor_bytes"] - logits(256) + logits(1000))


def test_the_gpu_smoke_script_is_skipped_and_says_so_without_a_gpu():
    import os
    import subprocess
    import sys

    bindir = os.path.dirname(sys.executable)
    done = subprocess.run(["bash", "benchmarks/gpu_smoke.sh"], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert done.returncode == 0 and "gpu_smoke: skipped: no CUDA device here" in done.stdout


def test_run_bench_passes_device_and_dtype_only_to_the_benches_that_take_them(monkeypatch):
    from suite import benches
    from suite.errors import ConfigError

    seen = {}
    monkeypatch.setitem(benches.BENCHES._entries, "probe", lambda device="cpu", dtype="bfloat16": seen.update(
        device=device, dtype=dtype) or {})
    benches.run_bench("probe", None, device="auto", dtype="float32")
    assert seen == {"device": "auto", "dtype": "float32"}
    with pytest.raises(ConfigError, match="does not take --dtype"):
        benches.run_bench("speed", None, dtype="float16")
