"""One adapter per supported model family: the only place that names a family's modules and config keys.

Structures, gates, capture, compaction and checkpoint I/O ask the adapter for a layer's attention projections,
its MLP projections or experts, the module that consumes a group's units, and which widths a stock config of the
family can declare. The six families here share Hugging Face's module names, so they are six instances of one
adapter; a family that fuses q/k/v or names its MLP differently is a subclass that overrides those answers.

Adding a family: register its adapter here (and its pruned classes in `modeling_prunebench.FAMILY_KEYS`, the shipped
code's own table), and give `suite.testing.tiny_config` a tiny config of it; the contract matrix and the golden
tests then run every method on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from suite.errors import UnsupportedModel
from suite.model.modeling_prunebench import FAMILY_KEYS
from suite.model.modules import is_experts
from suite.registry import Registry

UnitKind = str  # "attn" | "mlp" | "expert": what a Group's units are


class AttentionProjections(NamedTuple):
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


class MlpProjections(NamedTuple):
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass(frozen=True)
class Family:
    """A decoder-only causal LM family laid out as Hugging Face's Llama: `model.layers[i].self_attn.{q,k,v,o}_proj`,
    `mlp.{gate,up,down}_proj` or `mlp.experts` (with the router `mlp.gate`)."""

    model_type: str
    dense_width_key: str = "intermediate_size"  # the config key of a dense MLP's width
    expert_width_key: str | None = None  # the config key of an expert's width (MoE families)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attention_projections(self, layer: nn.Module) -> AttentionProjections:
        a = self.attention(layer)
        return AttentionProjections(a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_projections(self, layer: nn.Module) -> MlpProjections | None:
        """A dense MLP's projections; None for an MoE layer."""
        m = self.mlp(layer)
        if self.moe(layer) is not None or not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return None
        return MlpProjections(m.gate_proj, m.up_proj, m.down_proj)

    def set_mlp_projections(self, layer: nn.Module, projections: MlpProjections) -> None:
        """Install rebuilt projections (compaction)."""
        m = self.mlp(layer)
        m.gate_proj, m.up_proj, m.down_proj = projections

    def moe(self, layer: nn.Module) -> nn.Module | None:
        """The MoE block whose `.experts` holds the layer's experts (gates swap that attribute); None when dense."""
        m = self.mlp(layer)
        experts = getattr(m, "experts", None)
        return m if experts is not None and is_experts(experts) else None

    def router_width(self, layer: nn.Module) -> int:
        """The hidden size the router reads (an expert channel owns 3 x this many weights)."""
        return self.mlp(layer).gate.weight.shape[1]

    def shared_expert(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.mlp(layer), "shared_expert", None)

    def consumer(self, layer: nn.Module, kind: UnitKind) -> nn.Linear:
        """The linear whose input columns are the units of `kind` (attention: o_proj; MLP: down_proj). Experts have
        no single consumer module: their down projections live in the experts module (`modules.expert_weights`)."""
        if kind == "attn":
            return self.attention_projections(layer).o
        if kind == "mlp":
            projections = self.mlp_projections(layer)
            if projections is not None:
                return projections.down
        raise UnsupportedModel(f"{self.model_type}: {kind} units have no single consumer module")

    def declarable(self, config: Any, sizes: dict[str, int]) -> Any:
        """The family's config with `sizes`, or None where its own validator refuses them (Llama wants
        hidden_size % heads == 0): the validator has the last word on what a stock checkpoint can declare."""
        try:
            return type(config).from_dict(config.to_dict() | sizes)
        except (ValueError, StrictDataclassError):
            return None

    def width_key(self, kind: UnitKind) -> str | None:
        """The config key that declares the width of `kind` units in a stock checkpoint."""
        return {"mlp": self.dense_width_key, "expert": self.expert_width_key}.get(kind)


FAMILIES: Registry[Family] = Registry("model family", UnsupportedModel)
for _name, (_, _dense, _expert) in FAMILY_KEYS.items():
    FAMILIES.add(_name, Family(_name, _dense, _expert))


def family_of(model: nn.Module) -> Family:
    """The adapter of a loaded model of a supported family (refused, listing the supported ones, otherwise)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"unsupported model family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM of a supported family."""
    return family_of(model).layers(model)
