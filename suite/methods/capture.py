"""Calibration statistics every data-driven one-shot method needs, written once.

* Layer-wise capture (`walk`): calibration activations go through the decoder one layer at a time. For each layer
  the inputs of its *consumers* — o_proj (attention units), down_proj (MLP channels), each expert's down
  projection (expert channels) — are summarised in `InputStats` (column sums and squares in fp64, optionally the
  fp32 Gram matrix X^T X). The caller may then change that layer's weights (remove units, refit, add a bias) before
  the walk computes the layer's outputs, so layer l+1 sees the already-pruned prefix (`sequential=True`, as
  SlimGPT and Wanda do) or the dense one (`sequential=False`, as FLAP's global selection does). Only one layer's
  activations are held at a time: memory grows with calibration size, not depth.
* Gradient capture (`gradients`): the calibration loss gradient of every prunable weight, and optionally the
  diagonal Fisher from per-sample gradients (LLM-Pruner's Taylor importance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from suite.model.families import Family, decoder_layers, family_of
from suite.model.loss import next_token_nll
from suite.model.modules import GatedExperts, eval_mode, expert_weights, model_device, on_device, to_device
from suite.model.structures import Group, Structure, group_parts, unit_sum

CHUNK = 2048  # rows per step of InputStats.update


@dataclass
class InputStats:
    """Running statistics of a consumer's input X [tokens, C]."""

    columns: int
    gram: bool = False
    n: int = 0
    sum: Tensor = field(init=False)
    sumsq: Tensor = field(init=False)
    xtx: Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.columns, dtype=torch.float64)
        self.sumsq = torch.zeros(self.columns, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Add a batch of rows, `CHUNK` rows at a time: the fp64 and fp32 copies of a whole batch at real widths
        (8 x 2048 tokens x 28672 channels is 3.8 GB in fp64) would outweigh the layer itself."""
        x = x.detach().reshape(-1, self.columns)
        self.n += len(x)
        for chunk in x.split(CHUNK):
            x64 = chunk.double()
            self.sum += x64.sum(0).cpu()
            self.sumsq += (x64 * x64).sum(0).cpu()
            if self.gram:
                x32 = chunk.float()
                g = x32.T @ x32
                self.xtx = g if self.xtx is None else self.xtx.add_(g)

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.n, 1)

    @property
    def variance(self) -> Tensor:
        """Sample variance per column (FLAP's fluctuation), ddof 1."""
        if self.n < 2:
            return torch.zeros(self.columns, dtype=torch.float64)
        return (self.sumsq - self.n * self.mean**2).clamp_min(0) / (self.n - 1)

    @property
    def norm(self) -> Tensor:
        """||X_j||_2 per column (Wanda)."""
        return self.sumsq.sqrt()

    def hessian(self, damp: float) -> Tensor:
        """H = X^T X in fp64 with dead columns made harmless (unit diagonal) and `damp * mean(diag)` added."""
        if not self.gram:
            raise RuntimeError("Gram matrix was not captured (walk(..., gram=True))")
        if self.xtx is None:  # no token reached this consumer (an expert the router never picked)
            h = torch.zeros(self.columns, self.columns, dtype=torch.float64)
        else:
            h = self.xtx.double().clone()
        dead = h.diagonal() == 0
        h[dead, :] = 0
        h[:, dead] = 0
        h.diagonal().add_(dead.double())
        h.diagonal().add_(damp * float(h.diagonal().mean()))
        return h


def consumer_weight(model: nn.Module, group: Group) -> Tensor:
    """The weight [out, C] that consumes the group's units: o_proj, down_proj, or the expert's down projection.

    A view: writing into it changes the model (fused expert tensors included)."""
    family = family_of(model)
    layer = family.layers(model)[group.layer]
    if group.kind == "expert":
        return expert_weights(family.moe(layer).experts, group.expert)[2]
    return family.consumer(layer, group.kind).weight


def unit_columns(group: Group) -> Tensor:
    """[n_units, columns per unit]: which consumer input columns each unit owns."""
    width = group.head_dim * group.heads_per_unit if group.kind == "attn" else 1
    return torch.arange(group.n_units * width).view(group.n_units, width)


def remove_units(model: nn.Module, group: Group, keep: Tensor) -> None:
    """Zero the consumer columns of removed units: the layer now computes what its compact version will."""
    with torch.no_grad():
        cols = unit_columns(group)[~keep].flatten()
        consumer_weight(model, group)[:, cols] = 0


@contextlib.contextmanager
def _capture(family: Family, layer: nn.Module, groups: list[Group], stats: dict[str, InputStats]) -> Iterator[None]:
    """Each group's consumer inputs into its stats while the block runs (experts observed inside their module)."""
    handles = [family.consumer(layer, g.kind).register_forward_pre_hook(
        lambda _m, args, s=stats[g.name]: s.update(args[0])) for g in groups if g.kind != "expert"]
    experts = {g.expert: stats[g.name] for g in groups if g.kind == "expert"}
    block = family.moe(layer) if experts else None
    original = block.experts if block is not None else None
    if block is not None:
        block.experts = GatedExperts(original, lambda _e: None, observe=lambda e, h: experts[e].update(h))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if block is not None:
            block.experts = original


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, ids: Tensor, batch_size: int, device: torch.device) -> list[tuple[Tensor, dict]]:
    """(hidden states, keyword arguments) that decoder layer 0 receives, per calibration batch, on `device` (the
    embeddings run where the model is; nothing past layer 0 runs)."""
    first = decoder_layers(model)[0]
    captured: list[tuple[Tensor, dict]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(to_device((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}),
                                  device))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    home = model_device(model)
    try:
        for batch in ids.split(batch_size):
            with contextlib.suppress(_Stop):
                model(batch.to(home), use_cache=False)
    finally:
        handle.remove()
    return captured


def _run(layer: nn.Module, inputs: list[tuple[Tensor, dict]]) -> list[tuple[Tensor, dict]]:
    out = []
    for hidden, kwargs in inputs:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


@torch.no_grad()
def walk(model: nn.Module, structure: Structure, ids: Tensor, *, gram: bool = False, sequential: bool = True,
         batch_size: int = 8, device: torch.device | None = None) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """Yield (layer index, consumer input stats by group name) for every decoder layer, in order.

    The caller may edit layer l's weights before asking for the next layer; with `sequential` the edits shape the
    inputs of every later layer. `device` (default: where the model is) is where the work happens: each layer is
    moved there while it is measured and edited, and back afterwards, so a model kept on the CPU is pruned with one
    layer, its calibration activations and its statistics on the accelerator."""
    device = model_device(model) if device is None else torch.device(device)
    with eval_mode(model):
        inputs = _layer_inputs(model, ids, batch_size, device)
        for index, layer in enumerate(decoder_layers(model)):
            with on_device(layer, device):
                groups = structure.layer_groups(index)
                width = {g.name: int(consumer_weight(model, g).shape[1]) for g in groups}
                stats = {g.name: InputStats(width[g.name], gram=gram) for g in groups}
                with _capture(family_of(model), layer, groups, stats):
                    outputs = _run(layer, inputs)
                yield index, stats
                del stats
                if sequential:
                    del outputs  # recomputed through the edited layer
                    inputs = _run(layer, inputs)
                else:
                    inputs = outputs


@dataclass
class Gradients:
    """Calibration-loss gradient (mean over sequences) and, optionally, the per-sample diagonal Fisher."""

    grad: dict[int, Tensor]  # by id(parameter)
    fisher: dict[int, Tensor] | None = None

    def of(self, param: Tensor) -> Tensor:
        return self.grad[id(param)]


def prunable_parameters(model: nn.Module, structure: Structure) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for g in structure.groups:
        for part in group_parts(model, g):
            seen.setdefault(id(part.param), part.param)
    return list(seen.values())


def gradients(model: nn.Module, structure: Structure, ids: Tensor, *, fisher: bool = False,
              batch_size: int = 8, weights: Tensor | None = None) -> Gradients:
    """Backward passes over the calibration set, gradients of the prunable weights only (others stay frozen).

    The loss is sum(weights * next-token NLL) with `weights` [n, seq_len - 1] over predicted positions; the default,
    1 / (n (seq_len - 1)) everywhere, is the mean LM loss. Signed weights give other objectives through the same
    passes (GISP's margin: `suite.data.tasks.margin_set`).
    `fisher`: one backward per sequence, accumulating g_n^2 / N as well (LLM-Pruner's second-order term); it needs
    the mean LM loss, whose per-sequence gradient g_n it squares."""
    n = len(ids)
    if weights is None:
        weights = torch.full((n, ids.shape[1] - 1), 1 / (n * (ids.shape[1] - 1)))
    elif fisher:
        raise ValueError("the Fisher diagonal is defined for the mean LM loss only")
    params = prunable_parameters(model, structure)
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    grad = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    fish = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params} if fisher else None
    device = model_device(model)
    try:
        with eval_mode(model):
            step = 1 if fisher else batch_size
            for batch, w in zip(ids.split(step), weights.split(step), strict=True):
                batch = batch.to(device)
                logits = model(batch, use_cache=False).logits.float()
                nll = next_token_nll(logits, batch, reduction="none")
                (nll * w.to(device).flatten()).sum().backward()
                for p in params:
                    g = p.grad.float()
                    grad[id(p)] += g
                    if fish is not None:  # g = g_n / n here (one sequence), so g_n^2 / n = n g^2
                        fish[id(p)] += n * g * g
                    p.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    return Gradients(grad, fish)


def add_output_bias(model: nn.Module, group: Group, delta: Tensor) -> None:
    """Add `delta` [out] to the consumer's bias, creating the bias if the module had none (FLAP's compensation).

    Compaction keeps the bias and records it in the layout, so save/reload carry it."""
    if group.kind == "expert":
        raise ValueError("expert down projections have no bias in the fused layout")
    family = family_of(model)
    lin = family.consumer(family.layers(model)[group.layer], group.kind)
    with torch.no_grad():
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                    requires_grad=False)
        lin.bias += delta.to(lin.bias)


def taylor_scores(model: nn.Module, structure: Structure, grads: Gradients) -> dict[str, Tensor]:
    """Per unit, the sum over every weight it owns of |W g| (first-order Taylor), or |W g - W^2 F / 2| when the
    Fisher diagonal was captured (LLM-Pruner's `param_mix`)."""
    def importance(p: Tensor) -> Tensor:
        w = p.detach().float()
        first = w * grads.of(p)
        if grads.fisher is None:
            return first.abs()
        return (first - 0.5 * w * w * grads.fisher[id(p)]).abs()

    return {g.name: unit_sum(model, g, importance) for g in structure.groups}
