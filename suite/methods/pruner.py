"""The Pruner contract, PruneResult, and the method registry.

A method is one module and one decorator: `@register("name")` on a `Pruner` subclass with a pydantic `Config`.
The registry finds methods by importing every module of the method packages (`baselines`, `ddp`) and any
`prunebench.methods` entry point of an installed plugin, the first time a method is asked for; suite/ never
imports a method by name.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from suite.data.calibration import Calibration
from suite.errors import ConfigError, UnknownMethod
from suite.model.masks import Masks, Normalize, SelectionMode, Target, select
from suite.model.structures import Structure
from suite.registry import Registry

METHOD_PACKAGES = ("baselines", "ddp")
ENTRY_POINT_GROUP = "prunebench.methods"


class MethodConfig(BaseModel):
    """Base of every method's hyperparameters: unknown keys are refused, values are type-checked.

    Defaults are the published method (its paper, or its reference code where the paper is silent; a documented
    reading where neither says: docs/methods.md has one table per method). A setting that departs from them names
    itself in the row's label (`departures`), so a table row called by a method's bare name is the published
    method. Two kinds of setting never do: `budget` settings size the computation (steps, batch, search sizes) and
    are recorded as hyperparameters like every setting; and a `preset` names a bundle of departures at once."""

    model_config = ConfigDict(extra="forbid")
    # settings that size the computation (or keep extra outputs) rather than choose the algorithm: a row does not name
    # them in its label
    budget: ClassVar[frozenset[str]] = frozenset()
    # named bundles of departures (`preset: NAME` in params); a config with presets declares a `preset` field
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """`preset: NAME` sets that preset's values under any the params give explicitly."""
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in cls.presets:
                raise ValueError(f"preset: unknown preset {name!r}; allowed: {', '.join(cls.presets) or 'none'}")
            data = cls.presets[name] | data
        return data

    def departures(self) -> dict[str, Any]:
        """The settings in which this config departs from the method's published defaults, as a row's label shows
        them: every non-default setting outside `budget`, with a preset's own values folded into `preset=NAME`."""
        preset = self.presets.get(getattr(self, "preset", None) or "", {})
        out = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            reference = preset[name] if name in preset else info.get_default(call_default_factory=True)
            if name not in self.budget and value != reference:
                out[name] = value
        return out


class SelectionConfig(MethodConfig):
    """How a score-based method turns its scores into masks (suite.model.masks.select)."""

    selection: SelectionMode = Field("per_layer", description="global ranking, per-layer uniform ratio, or uniform")
    normalize: Normalize = Field("per_param", description="rank global scores per parameter or raw")


@dataclass
class PruneResult:
    """What a pruner hands back: masks (plus any weight changes made in place), curves, timings, diagnostics."""

    masks: Masks
    curves: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    nested: dict[float, Masks] = field(default_factory=dict)  # lower-sparsity subsets met on the way (GISP)

    def save(self, directory: Path) -> None:
        """The masks, each nested subset under `nested/sp<level>/`, and `curves.json` when there are curves: the
        same layout for `prunebench prune --out` and for a run's MLflow artifacts."""
        self.masks.save(directory)
        for level, masks in self.nested.items():
            masks.save(directory / "nested" / f"sp{level:g}")
        if self.curves:
            (directory / "curves.json").write_text(json.dumps(self.curves))


class Pruner(ABC):
    """prune(model, structure, calibration, target) -> PruneResult.

    The runner hands every pruner a freshly loaded model; a pruner may change weights in place (reconstruction
    methods do) but must leave no hooks or swapped modules behind.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = False
    # the method's default Optuna search space, {hyperparameter: {type, low, high, log, choices}} (see SearchDim in
    # `prunebench methods`); empty: `tune` asks for one in the experiment's YAML
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    # Config overrides that scale the method down for tiny models in tests (few steps, small batches)
    quick: ClassVar[dict[str, Any]] = {}
    # a method that only ever computes on one decoder layer at a time (it walks the decoder with
    # `suite.methods.capture.walk`) is handed a model that may stay on the CPU, and moves each layer to `device`
    offloads: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        # where the work happens when the model stays elsewhere (offloading methods; None: where the model is)
        self.device: torch.device | None = None
        # called as step_callback(step, curves) by iterative methods (tuning reports intermediate losses)
        self.step_callback: Callable[[int, dict[str, list[float]]], None] | None = None

    @abstractmethod
    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        """Choose the units to remove so that `target` is met."""

    def check_target(self, target: Target) -> None:
        """Refuse (ConfigError) a target this method cannot meet; called by the preflight before any run starts,
        and by a method's own `prune`. Every target is fine by default."""
        del target


def calibration_ids(method: str, calibration: Calibration | None) -> Tensor:
    """The calibration token ids [n, seq_len], or a clear error for a data-driven method run without data."""
    if calibration is None:
        raise ConfigError(f"{method} needs calibration data")
    return calibration.input_ids


class ScorePruner(Pruner):
    """A method that scores units once and keeps the best under the target, through the shared `select`."""

    Config: ClassVar[type[MethodConfig]] = SelectionConfig

    @abstractmethod
    def scores(self, model: nn.Module, structure: Structure, calibration: Calibration | None, *,
               seed: int) -> dict[str, Tensor]:
        """Per group [n_units], higher = more important."""

    def prune(
        self, model: nn.Module, structure: Structure, calibration: Calibration | None, target: Target, *, seed: int = 0
    ) -> PruneResult:
        scores = self.scores(model, structure, calibration, seed=seed)
        masks = select(structure, scores, target, mode=self.config.selection, normalize=self.config.normalize,
                       seed=seed)
        return PruneResult(masks)


def _discover() -> None:
    """Import every module of the method packages and every installed plugin's entry point (each registers)."""
    for package in METHOD_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin is the user's to fix: one line naming it
            raise ConfigError(f"method plugin {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                              ) from None


METHODS: Registry[type[Pruner]] = Registry("method", UnknownMethod, discover=_discover)


def register(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator: make a Pruner available under `name`."""

    def decorate(cls: type[Pruner]) -> type[Pruner]:
        cls.name = name
        return METHODS.add(name, cls)

    return decorate


def methods() -> Mapping[str, type[Pruner]]:
    """Every registered method, by name."""
    return dict(sorted(METHODS.items()))


def get_method(name: str) -> type[Pruner]:
    """The method class registered as `name`; an unknown name is refused with the closest matches."""
    return METHODS[name]
