"""`prunebench bench NAME`: benchmarks that print ratios measured side by side in one run, never timed tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.errors import ConfigError

BENCHES: dict[str, Callable[..., dict[str, Any]]] = {}


def bench(name: str):
    def register(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        BENCHES[name] = fn
        return fn

    return register


def run_bench(name: str, out: Path | None, models: list[str] | None = None) -> dict[str, Any]:
    """Run a bench; `models` replaces a model-comparing bench's default models."""
    if name not in BENCHES:
        raise ConfigError(f"unknown bench {name!r}; available: {', '.join(BENCHES)}")
    result = BENCHES[name](models) if models else BENCHES[name]()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


@bench("speed")
def speed_bench(models: list[str] | None = None) -> dict[str, Any]:
    """Dense vs 50%-pruned compact ~100M-parameter Llama (random init): prefill throughput against the ideal.
    (`models` is not used: the model is built from a config.)"""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from suite.evaluate import speed
    from suite.pipeline import prune_model
    from suite.pruner import get_method

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=1024)
    dense = AutoModelForCausalLM.from_config(config).eval()
    pruned = AutoModelForCausalLM.from_config(config).eval()
    pruned.load_state_dict(dense.state_dict())
    from suite.masks import Target

    method = get_method("magnitude")
    prune_model(pruned, "magnitude", method.Config(), Target(sparsity=0.5, round_to=64))
    r = speed(pruned, dense, batch=2, prefill_len=512, decode_tokens=32, repeats=5)
    r["params_dense"] = sum(p.numel() for p in dense.parameters())
    r["params_pruned"] = sum(p.numel() for p in pruned.parameters())
    r["prefill_fraction_of_ideal"] = r["prefill_speedup"] / r["ideal_speedup"]
    print(f"speed @50% (magnitude, Llama {r['params_dense'] / 1e6:.0f}M -> {r['params_pruned'] / 1e6:.0f}M, "
          f"batch 2 x 512, fp32, {torch.get_num_threads()} threads): prefill {r['prefill_speedup']:.2f}x "
          f"(ideal {r['ideal_speedup']:.2f}x, {r['prefill_fraction_of_ideal']:.2f} of ideal), "
          f"decode {r['decode_speedup']:.2f}x")
    return r


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def steps_to_reach(curves: dict[str, list[float]], loss: float, target: float, tol: float = 0.01) -> int | None:
    """First step (1-based) at the target hard sparsity whose smoothed LM loss is at most `loss`."""
    for i, (value, sparsity) in enumerate(zip(_smooth(curves["lm_loss"]), curves["hard_sparsity"], strict=True)):
        if sparsity >= target - tol and value <= loss:
            return i + 1
    return None


def prune_and_evaluate(model_spec: str, method: str, overrides: dict[str, Any], sparsity: float, seed: int,
                       calibration: Any, eval_spec: Any) -> dict[str, Any]:
    """Fresh model -> prune -> compact -> evaluate; one row of a bench table."""
    from suite.evaluate import evaluate
    from suite.masks import Target
    from suite.models import load_model
    from suite.pipeline import prune_model
    from suite.pruner import get_method

    model, tokenizer = load_model(model_spec)
    hyper = get_method(method).Config(**overrides)
    outcome = prune_model(model, method, hyper, Target(sparsity=sparsity), seed=seed, calibration=calibration)
    result = evaluate(model, tokenizer, eval_spec)
    ppl = next(iter(result["ppl"].values()))["ppl"]
    return {"model": model_spec, "method": method, "sparsity": sparsity, "seed": seed, "test_ppl": ppl,
            "mean_acc": result["mean_acc"], "tasks": {t: v["acc"] for t, v in result["tasks"].items()},
            "metrics": outcome.metrics, "curves": outcome.result.curves, "protocol": result["protocol"]["hash"]}


def dense_reference(model_spec: str, spec: Any, valid_n: int) -> tuple[Any, dict[str, float]]:
    """The bench calibration set (embedded train, 128 x 256, seed 0) and the dense model's scores under `spec`."""
    from suite.data import CalibrationSpec
    from suite.evaluate import evaluate
    from suite.models import load_model

    model, tokenizer = load_model(model_spec)
    calibration = CalibrationSpec(n=128, seq_len=256, valid_n=valid_n).build(tokenizer)
    d = evaluate(model, tokenizer, spec)
    return calibration, {"test_ppl": next(iter(d["ppl"].values()))["ppl"], "mean_acc": d["mean_acc"]}


@bench("ddp-vs-hc")
def ddp_vs_hc(models: list[str] | None = None) -> dict[str, Any]:
    """DDP vs hard-concrete on identical footing (model, calibration, steps, Lagrangian, seed): test perplexity,
    mean embedded-task accuracy, train-test mismatch, convergence, and wall time."""
    from suite.evaluate import EvalSpec

    budget = {"steps": 300, "batch_size": 8}
    spec = EvalSpec()
    rows, dense = [], {}
    for model_spec in models or ("zoo:tiny-llama", "zoo:tiny-qwen3"):
        calibration, dense[model_spec] = dense_reference(model_spec, spec, valid_n=16)
        for sparsity in (0.2, 0.5):
            pair = {m: prune_and_evaluate(model_spec, m, budget, sparsity, 0, calibration, spec)
                    for m in ("ddp", "hard_concrete")}
            hc_final = sum(pair["hard_concrete"]["curves"]["lm_loss"][-10:]) / 10
            for row in pair.values():
                diag = {k.removeprefix("diag_"): v for k, v in row["metrics"].items() if k.startswith("diag_")}
                row |= {"ppl_ratio": row["test_ppl"] / dense[model_spec]["test_ppl"],
                        "retained_acc": row["mean_acc"] / dense[model_spec]["mean_acc"],
                        "mismatch": diag["mismatch"], "convergence_step": diag["convergence_step"],
                        "effective_sparsity": diag["effective_sparsity"],
                        "steps_to_hc_final_loss": steps_to_reach(row["curves"], hc_final, sparsity),
                        "wall_seconds": row["metrics"]["prune_seconds"]}
                rows.append(row)
    print(f"{'model':<16} {'sp':>4} {'method':<14} {'test ppl':>9} {'x dense':>8} {'mean acc':>8} {'kept acc':>8} "
          f"{'mismatch':>9} {'conv.':>5} {'to HC loss':>10} {'eff. sp':>7} {'sec':>6}")
    for r in rows:
        reach = r["steps_to_hc_final_loss"]
        print(f"{r['model'].removeprefix('zoo:'):<16} {r['sparsity']:>4} {r['method']:<14} {r['test_ppl']:>9.3f} "
              f"{r['ppl_ratio']:>8.3f} {r['mean_acc']:>8.4f} {r['retained_acc']:>8.1%} {r['mismatch']:>9.4f} "
              f"{r['convergence_step']:>5} {reach if reach is not None else '-':>10} {r['effective_sparsity']:>7.3f} "
              f"{r['wall_seconds']:>6.0f}")
    for r in rows:
        r.pop("curves")
    return {"budget": budget, "dense": dense, "rows": rows}


class PeakMemory:
    """Peak resident memory above the level at entry, sampled from /proc every few ms (CUDA: the allocator's own
    peak). Sampling misses spikes shorter than the interval; good enough to tell one layer from the whole depth."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        import threading

        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._start = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss() - self._start)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._start)
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() - self._cuda_start


LOCAL_METHODS = ("wanda_sp", "flap", "slimgpt")


def depth_memory(method: str, layers: int) -> dict[str, Any]:
    """Peak prune memory of `method` on a random-init Llama with `layers` layers (run in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from suite.data import Calibration
    from suite.masks import Target
    from suite.pipeline import prune_model
    from suite.pruner import get_method

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, head_dim=32, intermediate_size=688)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 4096, (32, 256), generator=torch.Generator().manual_seed(0))
    calibration = Calibration.from_ids(ids, "random-tokens:n=32,seq_len=256")
    cls = get_method(method)
    with PeakMemory() as mem:
        prune_model(model, method, cls.Config(), Target(sparsity=0.5), calibration=calibration)
    return {"method": method, "layers": layers, "peak_mb": mem.peak / 2**20,
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


@bench("baselines")
def baselines_bench(models: list[str] | None = None) -> dict[str, Any]:
    """One-shot and local baselines on zoo models at 20% and 50%: test perplexity, mean task accuracy, prune
    seconds, peak prune memory; then peak memory against depth (2, 8, 16 layers) for the layer-wise methods, each
    in a fresh process, with `llm_pruner` (whole-model gradients) as the contrast."""
    import subprocess
    import sys

    from suite.evaluate import EvalSpec

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
                        "ppl_ratio": row["test_ppl"] / dense[model_spec]["test_ppl"],
                        "retained_acc": row["mean_acc"] / dense[model_spec]["mean_acc"]}
                rows.append(row)
    print(f"{'model':<16} {'sp':>4} {'method':<11} {'test ppl':>9} {'x dense':>8} {'mean acc':>8} {'kept acc':>8} "
          f"{'prune s':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['model'].removeprefix('zoo:'):<16} {r['sparsity']:>4} {r['method']:<11} {r['test_ppl']:>9.3f} "
              f"{r['ppl_ratio']:>8.3f} {r['mean_acc']:>8.4f} {r['retained_acc']:>8.1%} {r['prune_seconds']:>8.2f} "
              f"{r['peak_mb']:>8.1f}")
    depth = []
    for method in (*LOCAL_METHODS, "llm_pruner"):
        for layers in (2, 8, 16):
            code = ("import json; from suite.bench import depth_memory; "
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

    from suite.evaluate import EvalSpec

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
