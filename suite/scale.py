"""Scale measurements: every method on models with the real per-layer dimensions of 8B-70B checkpoints but one or
two decoder layers (random init), extrapolated to full depth in the open.

A cell (`scale_cell`) builds the model in a fresh process, prunes it once and reports wall time, peak resident memory
and peak tensor bytes above what the model itself holds, plus the exact bytes of one decoder layer and of the rest
(embeddings, final norm, LM head). Two depths give the per-layer slope of every number; `extrapolate` turns
(depth 1, depth 2) into a full-depth estimate with the formula it used:

    X(L) = X(1) + (L - 1) * (X(2) - X(1))

and the memory a device must hold: the whole model plus the method's peak for methods that run the whole model,
one decoder layer plus the method's peak for methods that walk the decoder (`Pruner.offloads`: the model stays in
CPU RAM). The vocabulary is cut to SCALE_VOCAB so the CPU can afford the LM head; the embeddings and head at the real
vocabulary are added exactly, and the logits of the real vocabulary are added as `head_passes` x tokens per pass x
V x 4 bytes for the methods that run the head (fp32 logits; backward methods hold the logits and their gradient).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SCALE_VOCAB = 8192  # the measured models' vocabulary (the real one is added analytically)
SEQ_LEN = 2048
GB = 1e9

# the real per-layer dimensions (from each model's config.json); `layers` and `vocab` are the real depth and vocabulary
SCALE_MODELS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"model_type": "llama", "layers": 32, "vocab": 128256,
                     "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                                "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
                                "tie_word_embeddings": False}},
    "llama-3.1-70b": {"model_type": "llama", "layers": 80, "vocab": 128256,
                      "config": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                                 "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
                                 "tie_word_embeddings": False}},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "layers": 48, "vocab": 151936,
                      "config": {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 32,
                                 "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                                 "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
                                 "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1000000.0,
                                 "tie_word_embeddings": False}},
}

# Iterative methods run a few of their steps; the time of the cut part is scaled to the configured count. Each entry:
# (overrides, what is scaled, the scaled timing's diagnostics key or None for the whole run, scale factor given the
# method's default config). Memory is that of the cut run: the same per step, except the mask learners' micro-batch
# (1 sequence here, reaching a configured batch by gradient accumulation).
_LEARNER = ({"steps": 2, "batch_size": 1, "valid_batches": 1}, "2 steps of 1 sequence, scaled to steps x batch_size",
            "train_seconds", lambda d: d.steps * d.batch_size / 2)
SCALE_CUTS: dict[str, tuple[dict[str, Any], str, str | None, Any]] = {
    "ddp": _LEARNER, "hard_concrete": _LEARNER, "maskprune": _LEARNER,
    "gisp": ({"iterations": 1}, "1 iteration, scaled to iterations", None, lambda d: d.iterations),
    "tyr": ({"rounds": 1, "generations": 1, "offspring": 2, "cache": False},
            "1 round of 1 generation of 2 offspring, search scaled to rounds x generations x offspring / 2",
            "search_seconds", lambda d: d.rounds * d.generations * d.offspring / 2),
}
# how many tokens' logits a method holds at once (1 sequence for the cut mask learners), and whether it also holds
# their gradient; None: the method never runs the head
HEAD_TOKENS = {"llm_pruner": ("batch_size", True), "gisp": ("batch_size", True), "ddp": (1, True),
               "hard_concrete": (1, True), "maskprune": (1, True), "tyr": ("batch_size", False)}


class PeakMemory:
    """Peak memory of a block above the level at its entry.

    `rss`: the resident set's high-water mark (the kernel's VmHWM, reset at entry), exact rather than sampled.
    `tensors`: bytes of live tensors: on a GPU the CUDA allocator's peak; on the CPU (with `tensors=True`) the
    allocations and frees torch's profiler reports, summed in order. `peak` is the GPU peak on a GPU, else `rss`."""

    def __init__(self, tensors: bool = False) -> None:
        self.track_tensors = tensors
        self.rss = 0
        self.tensors: int | None = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def __enter__(self) -> PeakMemory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        self._start = self._status("VmRSS")
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        elif self.track_tensors:
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss = self._status("VmHWM") - self._start
        if self._cuda:
            torch.cuda.synchronize()
            self.tensors = torch.cuda.max_memory_allocated() - self._cuda_start
        elif self.track_tensors:
            self._profile.__exit__(*exc)
            events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU]
            live = peak = 0
            for e in sorted(events, key=lambda e: e.start_ns()):
                live += e.nbytes()
                peak = max(peak, live)
            self.tensors = peak

    @property
    def peak(self) -> int:
        return self.tensors if self._cuda else self.rss


def scale_config(name: str, layers: int) -> Any:
    from transformers import AutoConfig

    spec = SCALE_MODELS[name]
    return AutoConfig.for_model(spec["model_type"], num_hidden_layers=layers, vocab_size=SCALE_VOCAB,
                                max_position_embeddings=SEQ_LEN, **spec["config"])


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def scale_cell(model_name: str, method: str, layers: int, n: int = 8, device: str = "cpu",
               dtype: str = "bfloat16", seq_len: int = SEQ_LEN, settings: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """One method on `model_name`'s per-layer dimensions at `layers` decoder layers (random init, seed 0), pruned to
    50% on n x seq_len random tokens: wall seconds (and the scaled seconds of a cut iterative method), peak RSS and
    tensor bytes above the loaded model, and the exact bytes of a decoder layer and of the rest. Run it in a fresh
    process: the resident set's high-water mark is the process's. `settings` adds method settings (a variant such
    as gradient checkpointing), recorded in the cell."""
    import tempfile
    from unittest import mock

    from transformers import AutoModelForCausalLM

    from suite.data.calibration import Calibration
    from suite.methods.pruner import get_method
    from suite.model.families import decoder_layers
    from suite.model.load import compute_device, parse_dtype, place
    from suite.model.masks import Target
    from suite.model.structures import build_structure

    torch.manual_seed(0)
    config = scale_config(model_name, layers)
    model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype)).eval()
    model.requires_grad_(False)
    cls = get_method(method)
    overrides, cut, timed, factor = SCALE_CUTS.get(method, ({}, "", None, None))
    pruner = cls(cls.Config(**overrides | (settings or {})))
    if cls.offloads:
        pruner.device = compute_device(device)  # the model stays in CPU RAM
    else:
        place(model, device)
    structure = build_structure(model)
    ids = torch.randint(0, SCALE_VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))
    calibration = Calibration.from_ids(ids, f"random-tokens:n={n},seq_len={seq_len}",
                                       valid_ids=ids[:1] if method == "tyr" else None)
    layer_bytes = _bytes(decoder_layers(model)[0])
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"PRUNEBENCH_CACHE": cache}):
        start = time.perf_counter()
        with PeakMemory(tensors=True) as mem:
            result = pruner.prune(model, structure, calibration, Target(sparsity=0.5), seed=0)
        seconds = time.perf_counter() - start
    scaled = seconds
    if factor is not None:
        part = seconds if timed is None else _timed(result, timed, seconds)
        scaled = seconds - part + part * factor(cls.Config())
    return {"model": model_name, "method": method, "layers": layers, "n": n, "seq_len": seq_len, "dtype": dtype,
            "settings": settings or {}, "device": str(compute_device(device)), "offloads": cls.offloads, "cut": cut,
            # on a GPU an offloading method's peak already counts the layer it moved there
            "layer_in_peak": cls.offloads and compute_device(device).type != "cpu",
            "seconds": seconds, "scaled_seconds": scaled, "rss_bytes": mem.rss, "tensor_bytes": mem.tensors,
            "layer_bytes": layer_bytes, "model_bytes": _bytes(model),
            "threads": torch.get_num_threads()}


def _timed(result: Any, key: str, total: float) -> float:
    """The seconds of a cut method's scaled part: its own timing (mask learners' training loop) or, for Týr, what is
    not the supernet (the search)."""
    if key == "search_seconds":
        return total - result.timings["supernet_seconds"]
    return result.timings[key]


def logits_bytes(method: str, batch_size: int | None, vocab: int, seq_len: int = SEQ_LEN) -> float:
    """The logits a method holds at once over `vocab` (fp32; with their gradient for backward methods); 0 for a
    method that never runs the LM head."""
    head = HEAD_TOKENS.get(method)
    if head is None:
        return 0.0
    rows = (batch_size or 1) if head[0] == "batch_size" else head[0]
    return rows * seq_len * vocab * 4 * (2 if head[1] else 1)


@dataclass
class Estimate:
    """A method's full-depth estimate on one model (FORMULAS), from its depth-1 cell."""

    model: str
    method: str
    layers: int
    seconds: float
    device_bytes: float  # what the compute device holds at the peak
    host_bytes: float  # CPU RAM holding the model while an offloading method works on one layer (0 otherwise)
    dominant: str
    basis: str = "one layer"  # whole-model methods: "bound" (W(1) per layer) or "slope" (measured at depth 2)

    def fits(self, gpus: int) -> bool:
        """Whether the device peak fits `gpus` x 80 GB, with 5% kept for the CUDA context and fragmentation (a
        model larger than one GPU sharded by accelerate's device_map, whole layers per GPU)."""
        return self.device_bytes <= gpus * GPU_BYTES * 0.95


GPU_BYTES = 80 * GB
FORMULAS = (
    "time T(L) = L x T(1)  (T(1) includes the fixed part once per layer: an upper bound)",
    "offloading methods: device = layer + W(1);  host RAM = L x layer + E(V)",
    "whole-model methods: device = L x layer + E(V) + L x (W(1) - Z(V_b)) + Z(V)  (every layer assumed to keep "
    "the whole working set: an upper bound); with a depth-2 cell, the measured slope instead: "
    "W(1) - Z(V_b) + (L - 1) x (W(2) - W(1)) in place of L x (W(1) - Z(V_b))",
    "layer: one decoder layer's weights; W(1): peak tensor bytes above the model at depth 1; E(V): embeddings, head "
    "and final norm at the real vocabulary V; Z(v): the logits the method holds at once over v tokens of "
    "vocabulary (fp32, x2 with their gradient); V_b = the measured models' vocabulary",
)


def extrapolate(cell: dict[str, Any], layers: int | None = None, vocab: int | None = None,
                two: dict[str, Any] | None = None) -> Estimate:
    """The full-depth estimate of a depth-1 cell (FORMULAS); `layers` and `vocab` default to the real model's (the
    bench's self-check predicts its own depth-2 cells with vocab = SCALE_VOCAB); `two`, the same method's depth-2
    cell, replaces the upper bound on the per-layer state by the measured slope."""
    from suite.methods.pruner import get_method

    spec = SCALE_MODELS[cell["model"]]
    label = cell["method"] + "".join(f"[{k}={v}]" for k, v in cell.get("settings", {}).items())
    depth = layers or spec["layers"]
    vocab = vocab or spec["vocab"]
    hidden = spec["config"]["hidden_size"]
    element = torch.empty(0, dtype=getattr(torch, cell["dtype"])).element_size()
    rest = (2 * vocab * hidden + hidden) * element
    work = cell["tensor_bytes"]  # live tensors: the allocator's view (RSS also counts freed heap malloc keeps)
    seconds = depth * cell["scaled_seconds"]
    if cell["offloads"]:
        held = work - (cell["layer_bytes"] if cell.get("layer_in_peak") else 0)  # the peak without the layer itself
        parts = {"one layer's weights": cell["layer_bytes"], "activations and statistics": held}
        return Estimate(cell["model"], label, depth, seconds, sum(parts.values()),
                        depth * cell["layer_bytes"] + rest, max(parts, key=parts.get))
    batch = getattr(get_method(cell["method"]).Config(), "batch_size", None)
    measured_logits = logits_bytes(cell["method"], batch, SCALE_VOCAB, cell["seq_len"])
    logits = logits_bytes(cell["method"], batch, vocab, cell["seq_len"])
    state = work - measured_logits
    per_layer = state if two is None else two["tensor_bytes"] - work
    parts = {"model weights": depth * cell["layer_bytes"] + rest,
             "method state": max(0.0, state + (depth - 1) * per_layer), "logits": logits}
    return Estimate(cell["model"], label, depth, seconds, sum(parts.values()), 0.0, max(parts, key=parts.get),
                    "bound" if two is None else "slope")


def measured_device_bytes(cell: dict[str, Any]) -> float:
    """What a device held in a measured cell, by the same rule as `extrapolate`."""
    if cell["offloads"]:
        return cell["tensor_bytes"] + (0 if cell.get("layer_in_peak") else cell["layer_bytes"])
    return cell["tensor_bytes"] + cell["model_bytes"]


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 2**20:.0f} MB"


def fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
