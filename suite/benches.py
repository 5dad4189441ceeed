"""`prunebench bench NAME`: benchmarks that print ratios measured side by side in one run, never timed tests."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from suite.errors import ConfigError
from suite.outputs import check_file, write_json
from suite.registry import Registry
from suite.run.record import retained

BENCHES: Registry[Callable[..., dict[str, Any]]] = Registry("bench")
bench = BENCHES.register  # @bench("name") on a function that measures and returns its numbers


def run_bench(name: str, out: Path | None, models: list[str] | None = None, jobs: int = 1, device: str = "cpu",
              dtype: str | None = None) -> dict[str, Any]:
    """Run a bench; `models` replaces a model-comparing bench's default models; `jobs` > 1 spreads the cells of a
    bench whose cells are independent runs over that many single-threaded processes; `device` and `dtype` go to the
    benches that take them (the others measure on the CPU in float32 and refuse anything else)."""
    from suite.model.load import parse_device, parse_dtype

    fn = BENCHES[name]
    kwargs: dict[str, Any] = {"models": models} if models else {}
    if dtype is not None:
        parse_dtype(dtype)
    for option, value, default in (("jobs", jobs, 1), ("device", parse_device(device), "cpu"), ("dtype", dtype, None)):
        if value == default:
            continue
        if option not in inspect.signature(fn).parameters:
            takers = ", ".join(n for n, f in BENCHES.items() if option in inspect.signature(f).parameters)
            raise ConfigError(f"bench {name} does not take --{option}; it is for {takers}")
        kwargs[option] = value
    if out is not None:
        check_file(out, "bench")  # before the minutes of measuring
    result = fn(**kwargs)
    if out is not None:
        write_json(out, result, "bench")
    return result


@bench("speed")
def speed_bench(models: list[str] | None = None) -> dict[str, Any]:
    """Dense vs 50%-pruned compact ~100M-parameter Llama (random init): prefill throughput against the ideal.
    (`models` is not used: the model is built from a config.)"""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from suite.evaluation.evaluate import speed
    from suite.methods.pruner import get_method
    from suite.run.pipeline import prune_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=1024)
    dense = AutoModelForCausalLM.from_config(config).eval()
    pruned = AutoModelForCausalLM.from_config(config).eval()
    pruned.load_state_dict(dense.state_dict())
    from suite.model.masks import Target

    prune_model(pruned, get_method("magnitude")(), Target(sparsity=0.5, round_to=64))
    r = speed(pruned, dense, batch=2, prefill_len=512, decode_tokens=32, repeats=5)
    r["params_dense"] = sum(p.numel() for p in dense.parameters())
    r["params_pruned"] = sum(p.numel() for p in pruned.parameters())
    r["prefill_fraction_of_ideal"] = r["prefill_speedup"] / r["ideal_speedup"]
    print(f"speed @50% (magnitude, Llama {r['params_dense'] / 1e6:.0f}M -> {r['params_pruned'] / 1e6:.0f}M, "
          f"batch 2 x 512, fp32, {torch.get_num_threads()} threads): prefill {r['prefill_speedup']:.2f}x "
          f"(ideal {r['ideal_speedup']:.2f}x, {r['prefill_fraction_of_ideal']:.2f} of ideal), "
          f"decode {r['decode_speedup']:.2f}x")
    return r


def prune_and_evaluate(model_spec: str, method: str, overrides: dict[str, Any], sparsity: float, seed: int,
                       calibration: Any, eval_spec: Any) -> dict[str, Any]:
    """Fresh model -> prune -> compact -> evaluate; one row of a bench table."""
    from suite.methods.pruner import get_method
    from suite.model.load import load_model
    from suite.model.masks import Target
    from suite.run.pipeline import evaluate_pruned, prune_model

    model, tokenizer = load_model(model_spec)
    cls = get_method(method)
    pruner = cls(cls.Config(**overrides))
    outcome = prune_model(model, pruner, Target(sparsity=sparsity), seed=seed, calibration=calibration)
    _, result = evaluate_pruned(model, tokenizer, eval_spec, dense={})  # retained %: against the bench's dense
    ppl = next(iter(result["ppl"].values()))["ppl"]
    return {"model": model_spec, "method": method, "sparsity": sparsity, "seed": seed, "test_ppl": ppl,
            "mean_acc": result["mean_acc"], "tasks": {t: v["acc"] for t, v in result["tasks"].items()},
            "metrics": outcome.metrics, "curves": outcome.result.curves, "protocol": result["protocol"]["hash"]}


def dense_reference(model_spec: str, spec: Any, valid_n: int, n: int = 128, seq_len: int = 256) -> tuple[Any, dict]:
    """The bench calibration set (embedded train, n x seq_len, seed 0) and the dense model's scores under `spec`."""
    from suite.evaluation.evaluate import evaluate
    from suite.model.load import load_model

    model, tokenizer = load_model(model_spec)
    calibration = _calibration(model_spec, n, seq_len, valid_n)
    d = evaluate(model, tokenizer, spec)
    return calibration, {"test_ppl": next(iter(d["ppl"].values()))["ppl"], "mean_acc": d["mean_acc"]}


@functools.cache
def _calibration(model_spec: str, n: int, seq_len: int, valid_n: int) -> Any:
    """Embedded train calibration, seed 0; built once per process (every cell of a bench shares it)."""
    from suite.data.calibration import CalibrationSpec
    from suite.model.load import load_model

    _, tokenizer = load_model(model_spec)
    return CalibrationSpec(n=n, seq_len=seq_len, valid_n=valid_n).build(tokenizer)


def _cell(model_spec: str, method: str, overrides: dict[str, Any], sparsity: float, seed: int,
          calibration: tuple[int, int, int], eval_spec: Any) -> dict[str, Any]:
    """One bench cell in whatever process runs it: its row without the curves, plus the mask-learning summary."""
    row = prune_and_evaluate(model_spec, method, overrides, sparsity, seed, _calibration(model_spec, *calibration),
                             eval_spec)
    curves = row.pop("curves")
    diag = {k.removeprefix("diag_"): v for k, v in row["metrics"].items() if k.startswith("diag_")}
    return row | {"overrides": overrides, "hard_sparsity_curve": curves.get("hard_sparsity", []),
                  **{k: diag.get(k) for k in ("mismatch", "convergence_step", "relaxed_sparsity", "projection_share",
                                              "effective_sparsity")},
                  "wall_seconds": row["metrics"]["prune_seconds"]}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_cells(cells: Sequence[tuple], jobs: int) -> list[dict[str, Any]]:
    """`_cell(*args)` for every cell, in order: in this process, or over `jobs` spawned single-threaded processes
    (spawned, not forked: a forked child inherits torch's OpenMP pool and can hang)."""
    if jobs <= 1:
        return [_cell(*c) for c in cells]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        return list(pool.map(_cell, *zip(*cells, strict=True)))


BENCH_CALIBRATION = (64, 128, 8)  # the quickstart's: embedded train, 64 x 128 tokens, 8 held out


# each DDP change alone on the budget-invariant base, then all together; "fixed lr" is the old 0.05 default
ABLATION = {
    "fixed lr 0.05": {"lr": 0.05, "lambda_lr": 0.05},
    "travel/T": {},
    "+wait (a)": {"wait": True},
    "+dense_start (b)": {"dense_start": True},
    "+reset (c)": {"overshoot": "reset"},
    "+polish (d)": {"polish": 0.1},
    "a+b+c": {"wait": True, "dense_start": True, "overshoot": "reset"},
    "a+b+c+d": {"wait": True, "dense_start": True, "overshoot": "reset", "polish": 0.1},
    # second round, after reading the first: without the wait, and halving instead of zeroing
    "b+c": {"dense_start": True, "overshoot": "reset"},
    "+damp (c')": {"overshoot": "damp"},
    "b+c'": {"dense_start": True, "overshoot": "damp"},
    "a+b+c'": {"wait": True, "dense_start": True, "overshoot": "damp"},
}
ABLATION_BASE = {"wait": False, "dense_start": False, "overshoot": "none", "polish": 0.0}


@bench("ddp-ablation")
def ddp_ablation(models: list[str] | None = None, jobs: int = 1, only: Sequence[str] = ()) -> dict[str, Any]:
    """Each DDP setting against the failure modes of a short run, alone and combined, at 120 and 300 steps, 20%
    and 50%, seed 0, on the quickstart's calibration and evaluation protocol; hard-concrete with and without the
    multiplier reset next to it (the Lagrangian is shared, so a reset DDP uses is one hard-concrete must get).
    `only` restricts the run to some variants (by label)."""
    from suite.evaluation.evaluate import EvalSpec, PplSpec

    spec = EvalSpec(ppl=(PplSpec.parse("embedded:test@256/128"),), limit=100)
    dense = {m: dense_reference(m, spec, BENCH_CALIBRATION[2], *BENCH_CALIBRATION[:2])[1]
             for m in models or ("zoo:tiny-llama", "zoo:tiny-qwen3")}
    variants = [("ddp", name, ABLATION_BASE | o) for name, o in ABLATION.items()]
    variants += [("hard_concrete", "hc travel/T", {"overshoot": "none"}),
                 ("hard_concrete", "hc +reset", {"overshoot": "reset"}),
                 ("hard_concrete", "hc +damp", {"overshoot": "damp"})]
    if only:
        variants = [v for v in variants if v[1] in only]
    cells, labels = [], []
    for m in dense:
        for sparsity in (0.2, 0.5):
            for steps in (120, 300):
                for method, name, o in variants:
                    if steps == 300 and name == "fixed lr 0.05":
                        continue  # travel / 300 is 0.05: the same run
                    cells.append((m, method, o | {"steps": steps, "batch_size": 8}, sparsity, 0, BENCH_CALIBRATION,
                                  spec))
                    labels.append(name)
    rows = run_cells(cells, jobs)
    for r, name in zip(rows, labels, strict=True):
        r |= {"variant": name, "steps": r["overrides"]["steps"],
              "ppl_ratio": r["test_ppl"] / dense[r["model"]]["test_ppl"]}
    print(f"{'model':<11} {'sp':>4} {'steps':>5} {'variant':<18} {'test ppl':>9} {'mean acc':>8} {'relaxed':>7} "
          f"{'proj.':>5} {'eff.':>6} {'mismatch':>8} {'sec':>5}")
    for r in rows:
        print(f"{r['model'].removeprefix('zoo:'):<11} {r['sparsity']:>4} {r['steps']:>5} {r['variant']:<18} "
              f"{r['test_ppl']:>9.2f} {r['mean_acc']:>8.4f} {r['relaxed_sparsity']:>7.4f} "
              f"{r['projection_share']:>5.3f} {r['effective_sparsity']:>6.4f} {r['mismatch']:>8.4f} "
              f"{r['wall_seconds']:>5.0f}")
    return {"calibration": "embedded train 64 x 128 (+8 held out), seed 0", "eval": "embedded test ppl@256/128, "
            "3 tasks x 100 items", "dense": dense, "rows": rows}


LOCAL_METHODS = ("wanda_sp", "flap", "slimgpt")


def depth_memory(method: str, layers: int) -> dict[str, Any]:
    """Peak prune memory of `method` on a random-init Llama with `layers` layers (run in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from suite.data.calibration import Calibration
    from suite.methods.pruner import get_method
    from suite.model.masks import Target
    from suite.run.pipeline import prune_model
    from suite.scale import PeakMemory

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, head_dim=32, intermediate_size=688)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 4096, (32, 256), generator=torch.Generator().manual_seed(0))
    calibration = Calibration.from_ids(ids, "random-tokens:n=32,seq_len=256")
    cls = get_method(method)
    with PeakMemory() as mem:
        prune_model(model, cls(), Target(sparsity=0.5), calibration=calibration)
    return {"method": method, "layers": layers, "peak_mb": mem.peak / 2**20,
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


@bench("baselines")
def baselines_bench(models: list[str] | None = None) -> dict[str, Any]:
    """One-shot and local baselines on zoo models at 20% and 50%: test perplexity, mean task accuracy, prune
    seconds, peak prune memory; then peak memory against depth (2, 8, 16 layers) for the layer-wise methods, each
    in a fresh process, with `llm_pruner` (whole-model gradients) as the contrast."""
    import subprocess
    import sys

    from suite.evaluation.evaluate import EvalSpec
    from suite.scale import PeakMemory

    spec = EvalSpec()
    rows, dense = [], {}
    for model_spec in models or ("zoo:tiny-llama", "zoo:tiny-qwen3"):
        calibration, dense[model_spec] = dense_reference(model_spec, spec, valid_n=0)
        for sparsity in (0.2, 0.5):
            for method in ("random", "magnitude", "llm_pruner", *LOCAL_METHODS):
                with PeakMemory() as mem:
                    row = prune_and_evaluate(model_spec, method, {}, sparsity, 0, calibration, spec)
                row.pop("curves")
                row |= {"prune_seconds": row["metrics"]["prune_seconds"], "peak_mb": mem.peak / 2**20,
                        "ppl_ratio": row["test_ppl"] / dense[model_spec]["test_ppl"]}
                row |= retained({"mean_acc": row["mean_acc"]}, dense[model_spec])
                rows.append(row)
    print(f"{'model':<16} {'sp':>4} {'method':<11} {'test ppl':>9} {'x dense':>8} {'mean acc':>8} {'kept acc':>8} "
          f"{'prune s':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['model'].removeprefix('zoo:'):<16} {r['sparsity']:>4} {r['method']:<11} {r['test_ppl']:>9.3f} "
              f"{r['ppl_ratio']:>8.3f} {r['mean_acc']:>8.4f} {r['retained.mean_acc']:>7.1f}% "
              f"{r['prune_seconds']:>8.2f} {r['peak_mb']:>8.1f}")
    depth = []
    for method in (*LOCAL_METHODS, "llm_pruner"):
        for layers in (2, 8, 16):
            code = ("import json; from suite.benches import depth_memory; "
                    f"print(json.dumps(depth_memory({method!r}, {layers})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            depth.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\npeak prune memory vs depth (random-init Llama h256, 32 x 256 calibration tokens, 50%):")
    for method in (*LOCAL_METHODS, "llm_pruner"):
        cells = [r for r in depth if r["method"] == method]
        print(f"  {method:<11} " + "  ".join(f"{r['layers']:>2} layers: {r['peak_mb']:6.1f} MB "
                                             f"(model {r['model_mb']:5.1f} MB)" for r in cells))
    return {"dense": dense, "rows": rows, "depth": depth, "eval": "embedded test ppl@256 + 3 tasks, full",
            "calibration": "embedded train n128 x 256, seed 0"}


@bench("seed-systems")
def seed_systems_bench(models: list[str] | None = None) -> dict[str, Any]:
    """GISP, Týr and MaskPrune at their default settings against `random` and SlimGPT (Týr's own local pruner at
    the uniform per-layer distribution) at 50% on zoo models: test perplexity, mean task accuracy, prune seconds.
    Týr lines: the searched distribution against the uniform one on the search objective (search tokens and held-out
    calibration), the same run again with the supernet in the cache (empty cache first, in a temporary dir), and
    under dense accumulation a 50% run after a 40% one (the removal orders serve both sparsities)."""
    import os
    import tempfile
    from unittest import mock

    from suite.evaluation.evaluate import EvalSpec

    spec = EvalSpec()
    rows, dense, tyr = [], {}, []
    for model_spec in models or ("zoo:tiny-llama",):
        calibration, dense[model_spec] = dense_reference(model_spec, spec, valid_n=8)
        for method in ("random", "slimgpt", "gisp", "maskprune", "tyr"):
            # Týr starts from an empty supernet cache
            with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"PRUNEBENCH_CACHE": cache}):
                runs = [prune_and_evaluate(model_spec, method, {}, 0.5, 0, calibration, spec)
                        for _ in range(2 if method == "tyr" else 1)]
            row = runs[0]
            row.pop("curves")
            row |= {"prune_seconds": row["metrics"]["prune_seconds"],
                    "ppl_ratio": row["test_ppl"] / dense[model_spec]["test_ppl"]}
            rows.append(row)
            if method == "tyr":
                first, second = (r["metrics"] for r in runs)
                with tempfile.TemporaryDirectory() as cache, \
                        mock.patch.dict(os.environ, {"PRUNEBENCH_CACHE": cache}):
                    lower, other = (prune_and_evaluate(model_spec, method, {"accumulate": "dense"}, sparsity, 0,
                                                       calibration, spec)["metrics"] for sparsity in (0.4, 0.5))
                tyr.append({"model": model_spec, **{k.removeprefix("diag_"): v for k, v in first.items()
                                                   if k.startswith("diag_fitness")},
                            "first_seconds": first["prune_seconds"], "cached_seconds": second["prune_seconds"],
                            "first_supernet_seconds": first["diag_supernet_seconds"],
                            "cached_supernet_seconds": second["diag_supernet_seconds"],
                            "built_modules": first["diag_built_modules"], "refit_levels": first["diag_refit_levels"],
                            "cached_built_modules": second["diag_built_modules"],
                            "cached_refit_levels": second["diag_refit_levels"],
                            "same_result": runs[0]["test_ppl"] == runs[1]["test_ppl"],
                            "dense_40": {k: lower[f"diag_{k}"] for k in ("built_modules", "refit_levels")},
                            "dense_50_after_40": {k: other[f"diag_{k}"] for k in ("built_modules", "refit_levels")}})
    print(f"{'model':<16} {'method':<10} {'sparsity':>8} {'test ppl':>9} {'x dense':>8} {'mean acc':>8} "
          f"{'prune s':>8}")
    for r in rows:
        print(f"{r['model'].removeprefix('zoo:'):<16} {r['method']:<10} {r['metrics']['sparsity']:>8.4f} "
              f"{r['test_ppl']:>9.3f} {r['ppl_ratio']:>8.3f} {r['mean_acc']:>8.4f} {r['prune_seconds']:>8.2f}")
    for t in tyr:
        print(f"\ntyr on {t['model']}: search objective (top-k KL to dense) uniform {t['fitness_uniform']:.4f} -> "
              f"searched {t['fitness_searched']:.4f} ({t['fitness_searched'] / t['fitness_uniform']:.3f}x); "
              f"held-out {t['fitness_uniform_held_out']:.4f} -> {t['fitness_searched_held_out']:.4f} "
              f"({t['fitness_searched_held_out'] / t['fitness_uniform_held_out']:.3f}x)")
        print(f"tyr second run: supernet {t['first_supernet_seconds']:.2f} s -> {t['cached_supernet_seconds']:.2f} s "
              f"(removal orders built {t['built_modules']} -> {t['cached_built_modules']}, levels refit "
              f"{t['refit_levels']} -> {t['cached_refit_levels']}), prune {t['first_seconds']:.1f} s -> "
              f"{t['cached_seconds']:.1f} s (the search is the rest), same result: {t['same_result']}")
        d40, d50 = t["dense_40"], t["dense_50_after_40"]
        print(f"tyr, dense accumulation, 40% then 50% on one cache: orders built {d40['built_modules']} then "
              f"{d50['built_modules']}, levels refit {d40['refit_levels']} then {d50['refit_levels']}")
    return {"dense": dense, "rows": rows, "tyr": tyr, "eval": "embedded test ppl@256 + 3 tasks, full",
            "calibration": "embedded train n128 x 256 (+8 held out), seed 0"}


RECOVERY_METHODS = ("random", "wanda_sp", "slimgpt", "ddp", "tyr")
# The bench's recovery learning rate: of 1e-4 (LLM-Pruner's, for 7B models and two epochs), 5e-4 and 2e-3, the one
# with the lowest training loss after 60 steps on wanda_sp's 50% model, for LoRA and distill alike (the test split
# played no part)
RECOVERY_LR = 2e-3
RECOVERY_STEPS = 200


@bench("recovery")
def recovery_bench(models: list[str] | None = None) -> dict[str, Any]:
    """Does a method's lead survive recovery? Each method prunes zoo:tiny-llama to 50% once (default settings, the
    quickstart's calibration); the compact model is evaluated as pruned (w/o tune), then after 200 LoRA steps and
    after 200 distill steps (KL to the dense model's logits, LoRA weights), each from its own copy of the pruned
    model, with the same recovery data and seed for every method. Prints test perplexity and mean task accuracy per
    stage, and each stage's ranking (by mean accuracy, and by perplexity) against the pruned one, with Kendall's
    tau."""
    import copy

    from scipy.stats import kendalltau

    from suite.evaluation.evaluate import EvalSpec
    from suite.methods.pruner import get_method
    from suite.model.load import load_model
    from suite.model.masks import Target
    from suite.recovery.spec import RecoverySpec
    from suite.recovery.train import recovery_windows
    from suite.run.pipeline import evaluate_stages, prune_model

    spec = EvalSpec()
    model_spec = (models or ["zoo:tiny-llama"])[0]
    calibration, dense = dense_reference(model_spec, spec, valid_n=BENCH_CALIBRATION[2], n=BENCH_CALIBRATION[0],
                                         seq_len=BENCH_CALIBRATION[1])
    teacher, tokenizer = load_model(model_spec)
    stages = {"lora": RecoverySpec(method="lora", steps=RECOVERY_STEPS, lr=RECOVERY_LR),
              "distill": RecoverySpec(method="distill", steps=RECOVERY_STEPS, lr=RECOVERY_LR)}
    data = recovery_windows(stages["lora"], tokenizer, "embedded")  # one data set: the specs differ in the loss only
    rows = []
    for method in RECOVERY_METHODS:
        pruned, _ = load_model(model_spec)
        cls = get_method(method)
        outcome = prune_model(pruned, cls(cls.Config()), Target(sparsity=0.5), seed=0, calibration=calibration)
        row: dict[str, Any] = {"method": method, "sparsity": outcome.metrics["sparsity"],
                               "prune_seconds": outcome.metrics["prune_seconds"]}
        for name, recovery in stages.items():
            result = evaluate_stages(copy.deepcopy(pruned), tokenizer, spec, {}, dense_model=teacher,
                                     recovery=recovery, data=data, seed=0)
            m, done = result.metrics, result.recovery
            for stage, key in (("pruned", "pruned"), ("recovered", name)):
                row[f"{key}_test_ppl"] = next(v for k, v in m.items() if k.startswith(f"{stage}.ppl."))
                row[f"{key}_mean_acc"] = m[f"{stage}.mean_acc"]
            row |= {f"{name}_loss_before": done.loss_before, f"{name}_loss_after": done.loss_after,
                    f"{name}_seconds": done.seconds, f"{name}_tokens": done.tokens}
        rows.append(row)
    ranks = {}
    for key in ("pruned", *stages):
        for metric, higher in (("mean_acc", True), ("test_ppl", False)):
            values = [r[f"{key}_{metric}"] for r in rows]
            ranks[f"{key}_{metric}"] = [sorted(values, reverse=higher).index(v) + 1 for v in values]
    taus = {f"{key}_{metric}": kendalltau(ranks[f"pruned_{metric}"], ranks[f"{key}_{metric}"]).statistic
            for key in stages for metric in ("mean_acc", "test_ppl")}
    print(f"{model_spec} at 50%: dense test ppl {dense['test_ppl']:.3f}, mean acc {dense['mean_acc']:.4f}; recovery "
          f"{stages['lora'].steps} steps of {stages['lora'].batch_size} x {stages['lora'].seq_len} tokens, lr "
          f"{RECOVERY_LR:g}, {stages['lora'].data.n} windows of embedded:train")
    print(f"{'method':<10} {'w/o tune ppl':>12} {'acc':>6} {'LoRA ppl':>9} {'acc':>6} {'distill ppl':>11} {'acc':>6}"
          f"  ranks by acc (w/o, LoRA, distill)")
    for i, r in enumerate(rows):
        ranked = ", ".join(str(ranks[f"{k}_mean_acc"][i]) for k in ("pruned", *stages))
        print(f"{r['method']:<10} {r['pruned_test_ppl']:>12.3f} {r['pruned_mean_acc']:>6.3f} "
              f"{r['lora_test_ppl']:>9.3f} {r['lora_mean_acc']:>6.3f} {r['distill_test_ppl']:>11.3f} "
              f"{r['distill_mean_acc']:>6.3f}  {ranked}")
    print("Kendall tau of each recovered ranking against the pruned one: " +
          ", ".join(f"{k} {v:.2f}" for k, v in taus.items()))
    return {"model": model_spec, "sparsity": 0.5, "dense": dense, "rows": rows, "ranks": ranks, "kendall_tau": taus,
            "recovery": {name: r.model_dump(mode="json") for name, r in stages.items()},
            "eval": "embedded test ppl@256 + 3 tasks, full",
            "calibration": "embedded train n64 x 128 (+8 held out), seed 0"}


CELL_SECONDS = 600  # a scale cell that runs longer is reported as not measured here (depth cells: DEPTH_SECONDS)
MEMORY_SHARE = 0.85  # of this machine's RAM a scale cell may address; beyond it the cell reports that it did not fit


def _limit_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def isolated_cell(seconds: int = CELL_SECONDS, **kwargs: Any) -> dict[str, Any]:
    """`suite.scale.scale_cell(**kwargs)` in a fresh process (its own resident high-water mark), with at most
    MEMORY_SHARE of this machine's RAM and `seconds`: a cell that needs more says so instead of taking the machine
    down (`{"error": ...}`)."""
    import subprocess
    import sys

    code = ("import json, sys; from suite.scale import scale_cell\n"
            "try:\n    r = scale_cell(**json.loads(sys.argv[1]))\n"
            "except (MemoryError, RuntimeError) as err:\n"
            "    r = {'error': str(err).strip().splitlines()[0][:200]}\n"
            "print(json.dumps(r))")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = int(total * MEMORY_SHARE)
    # CUDA maps far more address space than it uses: the limit is for CPU cells only
    limiter = functools.partial(_limit_memory, limit) if kwargs.get("device", "cpu") == "cpu" else None
    failed = {"model": kwargs["model_name"], "method": kwargs["method"], "layers": kwargs["layers"],
              "settings": kwargs.get("settings") or {}}
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                             timeout=seconds, preexec_fn=limiter)
    except subprocess.TimeoutExpired:
        return failed | {"error": f"over {seconds // 60} min on this machine"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return failed | {"error": f"exit {out.returncode}: {tail[:200]}"}
    result = json.loads(lines[-1])
    if "error" in result:
        result = failed | result
        if "memory" in result["error"].lower():
            result["error"] = f"out of memory within {limit / 1e9:.0f} GB here ({result['error']})"
    return result


# the memory options of the mask learners, measured beside their defaults
SCALE_VARIANTS = [("ddp", {"gradient_checkpointing": True})]
# whole-model methods measured at 2 layers too on every model (cheap: their per-layer working set is transient, and
# the upper bound would count it once per layer; the variants: checkpointing keeps one layer's activations, which
# the bound cannot see), and on the first model only, as a check of the formulas
SCALE_SLOPES = ("magnitude", "random")
SCALE_CHECKS = ("llm_pruner", "ddp")


@bench("scale")
def scale_bench(models: list[str] | None = None, device: str = "cpu", dtype: str = "bfloat16") -> dict[str, Any]:
    """Every registered method on models with the real per-layer dimensions of Llama-3.1-8B, Llama-3.1-70B and
    Qwen3-30B-A3B (random init, 1 decoder layer, vocabulary cut to 8192), 50% on 8 x 2048 random tokens, each in a
    fresh process: wall time (iterative methods cut and scaled), peak resident and tensor bytes above the model;
    extrapolated to full depth and the real vocabulary (suite.scale.FORMULAS) against 1 x 80 GB and 8 x 80 GB. A
    self-check prunes SCALE_CHECKS at 2 layers on the first model and compares with the upper bound; SCALE_SLOPES
    run at 2 layers on every model and their measured slope replaces the bound."""
    from suite.methods.pruner import methods
    from suite.scale import SCALE_MODELS

    names = models or list(SCALE_MODELS)
    for name in names:
        if name not in SCALE_MODELS:
            raise ConfigError(f"bench scale: unknown model {name!r}; known: {', '.join(SCALE_MODELS)}")
    cells = []
    for name in names:
        for method, settings in [*((m, None) for m in methods()), *SCALE_VARIANTS]:
            cells.append(isolated_cell(model_name=name, method=method, layers=1, device=device, dtype=dtype,
                                       settings=settings))
            _scale_line(cells[-1])
    checks, twos = [], []
    for name in names:
        for method, settings in [*((m, None) for m in (*SCALE_SLOPES, *(SCALE_CHECKS if name == names[0] else ()))),
                                 *SCALE_VARIANTS]:
            one = next((c for c in cells if c["method"] == method and c["model"] == name and "error" not in c
                        and c.get("settings") == (settings or {})), None)
            if one is None:
                continue
            two = isolated_cell(model_name=name, method=method, layers=2, device=device, dtype=dtype,
                                settings=settings)
            if "error" not in two:
                twos.append(two)
                if method in SCALE_CHECKS and not settings:
                    checks.append({"one": one, "two": two})
    return scale_table(cells, checks, twos)


def _scale_line(cell: dict[str, Any]) -> None:
    from suite.scale import extrapolate, fmt_bytes, fmt_seconds

    label = f"{cell['model']} {cell['method']}{cell.get('settings') or ''}"
    if "error" in cell:
        print(f"{label}: not measured: {cell['error']}", flush=True)
        return
    est = extrapolate(cell)
    print(f"{label}: {cell['scaled_seconds']:.1f} s/layer, peak +{fmt_bytes(cell['tensor_bytes'])} tensors "
          f"(+{fmt_bytes(cell['rss_bytes'])} RSS) -> {est.layers} layers: device {fmt_bytes(est.device_bytes)}, "
          f"{fmt_seconds(est.seconds)}", flush=True)


def scale_table(cells: list[dict[str, Any]], checks: list[dict[str, Any]], twos: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """The scale bench's table and self-check from its cells (depth 1), check pairs (depth 1 and 2: the upper
    bound's prediction against the measurement) and depth-2 cells (their measured slope replaces the bound),
    printed and returned as benchmarks/scale.json holds them."""
    from suite.scale import FORMULAS, SCALE_VOCAB, extrapolate, fmt_bytes, fmt_seconds, measured_device_bytes

    print("\n" + "\n".join(FORMULAS))
    print(f"\n{'model':<14} {'method':<13} {'per layer':>9} {'W(1)':>8} {'CPU, full depth':>15} "
          f"{'device peak':>11} {'basis':>9} {'host RAM':>9} {'1x80GB':>6} {'8x80GB':>6}  dominated by")
    estimates = []
    slopes = {(t["model"], t["method"], json.dumps(t.get("settings") or {})): t for t in twos}
    for c in cells:
        if "error" in c:
            print(f"{c['model']:<14} {c['method']:<13} not measured: {c['error']}")
            continue
        e = extrapolate(c, two=slopes.get((c["model"], c["method"], json.dumps(c.get("settings") or {}))))
        estimates.append(e)
        print(f"{e.model:<14} {e.method:<13} {fmt_seconds(c['scaled_seconds']):>9} "
              f"{fmt_bytes(c['tensor_bytes']):>8} {fmt_seconds(e.seconds):>15} {fmt_bytes(e.device_bytes):>11} "
              f"{e.basis:>9} {fmt_bytes(e.host_bytes) if e.host_bytes else '-':>9} {'yes' if e.fits(1) else 'no':>6} "
              f"{'yes' if e.fits(8) else 'no':>6}  {e.dominant}")
    summary = []
    for k in checks:
        one, two = k["one"], k["two"]
        predicted = extrapolate(one, layers=2, vocab=SCALE_VOCAB)
        row = {"model": one["model"], "method": one["method"], "depth2": two,
               "predicted_device_bytes": predicted.device_bytes, "measured_device_bytes": measured_device_bytes(two),
               "predicted_seconds": predicted.seconds, "measured_seconds": two["scaled_seconds"]}
        summary.append(row)
        print(f"self-check {row['model']} {row['method']} at 2 layers: device "
              f"{fmt_bytes(row['measured_device_bytes'])} measured vs {fmt_bytes(row['predicted_device_bytes'])} "
              f"predicted ({row['measured_device_bytes'] / row['predicted_device_bytes']:.2f}x); time "
              f"{row['measured_seconds']:.0f} s vs {row['predicted_seconds']:.0f} s")
    return {"formulas": FORMULAS, "vocab_measured": SCALE_VOCAB, "calibration": "8 x 2048 random tokens, seed 0",
            "sparsity": 0.5, "cells": cells, "checks": summary, "depth2": twos,
            "estimates": [e.__dict__ | {"fits_1x80GB": e.fits(1), "fits_8x80GB": e.fits(8)} for e in estimates]}


DEPTH_BOUND = 1.25  # depth-4 device peak over depth-1, for a method holding one layer at a time
DEPTH_SECONDS = 3600  # SlimGPT's OBS at 14336 channels takes minutes per layer on two cores


@bench("depth")
def depth_bench(models: list[str] | None = None, device: str = "cpu", dtype: str = "bfloat16") -> dict[str, Any]:
    """Peak memory at 4 decoder layers against 1, at Llama-3.1-8B's real width (random init, 8 x 512 random tokens,
    50%), for every offloading (layer-wise) method, each in a fresh process: the device holds one layer plus the
    calibration activations and statistics, so the ratio must stay below DEPTH_BOUND (it would be about 4 if the
    method held every layer's state); llm_pruner (whole-model gradients) is the contrast."""
    from suite.methods.pruner import methods
    from suite.scale import SCALE_MODELS

    name = (models or ["llama-3.1-8b"])[0]
    if name not in SCALE_MODELS:
        raise ConfigError(f"bench depth: unknown model {name!r}; known: {', '.join(SCALE_MODELS)}")
    layerwise = [m for m, cls in methods().items() if cls.offloads]
    print(f"peak device memory at 4 layers vs 1 ({name} width, 8 x 512 tokens, {dtype}); bound for layer-wise "
          f"methods: < {DEPTH_BOUND}x", flush=True)
    rows = [depth_row(name, method, device, dtype) for method in (*layerwise, "llm_pruner")]
    return {"model": name, "bound": DEPTH_BOUND, "calibration": "8 x 512 random tokens, seed 0", "rows": rows}


def depth_row(name: str, method: str, device: str = "cpu", dtype: str = "bfloat16") -> dict[str, Any]:
    """One method's line of the depth bench: its device peak at 1 and at 4 layers, each in a fresh process."""
    from suite.scale import fmt_bytes, measured_device_bytes

    cells = [isolated_cell(DEPTH_SECONDS, model_name=name, method=method, layers=layers, device=device, dtype=dtype,
                           seq_len=512) for layers in (1, 4)]
    if any("error" in c for c in cells):
        row = {"method": method, "error": next(c["error"] for c in cells if "error" in c)}
        print(f"  {method:<11} not measured: {row['error']}", flush=True)
        return row
    one, four = (measured_device_bytes(c) for c in cells)
    row = {"method": method, "offloads": cells[0]["offloads"], "device_1": one, "device_4": four,
           "ratio": four / one, "rss_ratio": cells[1]["rss_bytes"] / max(1, cells[0]["rss_bytes"]),
           "within_bound": four / one < DEPTH_BOUND if cells[0]["offloads"] else None, "cells": cells}
    verdict = ("within bound" if row["within_bound"] else "OVER BOUND") if row["offloads"] else "whole model"
    print(f"  {method:<11} 1 layer {fmt_bytes(one):>8}  4 layers {fmt_bytes(four):>8}  {row['ratio']:.2f}x "
          f"({verdict}; RSS above the model {row['rss_ratio']:.2f}x; "
          f"{cells[0]['seconds']:.0f} s and {cells[1]['seconds']:.0f} s)", flush=True)
    return row
