"""Typed experiment configuration: YAML -> pydantic, with errors that name the key path and the allowed values.

`--set a.b=c` overrides (list items by index: `methods.0.params.steps=50`) apply to the raw YAML before
validation, on every command, so an override is checked exactly like the file.
"""

from __future__ import annotations

import itertools
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from suite.data.calibration import CalibrationSpec
from suite.errors import ConfigError, PruneBenchError, did_you_mean
from suite.evaluation.evaluate import EvalSpec
from suite.methods.pruner import get_method
from suite.model.masks import TargetConstraints, pydantic_message
from suite.model.structures import Granularity
from suite.recovery.spec import RecoverySpec

M = TypeVar("M", bound=BaseModel)


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], c) with c read as YAML, so `0.5`, `true`, `[1, 2]` get their natural types."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any, where: str = "") -> None:
    """Assign `value` at a dotted path, creating mappings as needed; integer parts index lists."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        here = where + ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{here}: no item {part} (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{here}: {path[i - 1]} is not a mapping or list")


def validation_error(err: ValidationError, model: type[BaseModel], where: str = "") -> ConfigError:
    """One line naming the key path; unknown keys list the allowed ones."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        owner: Any = model
        for part in first["loc"][:-1]:
            field = getattr(owner, "model_fields", {}).get(part)
            annotation = getattr(field, "annotation", None)
            inner = [a for a in typing.get_args(annotation) if a is not type(None)]  # `X | None` -> X
            annotation = inner[0] if len(inner) == 1 else annotation
            owner = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else owner
        fields = list(getattr(owner, "model_fields", {}))
        hint = did_you_mean(str(first["loc"][-1]), fields)
        return ConfigError(f"{where}{loc}: unknown key{hint} (allowed: {', '.join(fields)})")
    return ConfigError(f"{where}{pydantic_message(err)}")


def apply_overrides(model: type[M], base: dict[str, Any], overrides: Iterable[str], where: str = "") -> M:
    """Validate `base` updated by dotted `key=value` overrides into `model`."""
    data = yaml.safe_load(yaml.safe_dump(base)) if base else {}  # a deep copy the overrides may change
    for text in overrides:
        path, value = parse_assignment(text)
        set_path(data, path, value, where)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, model, where) from None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _path_safe(value: str | None) -> str | None:
    """Names that become folder names under the workdir (experiment, MLflow experiment, method label) stay one
    plain path component: no separators, never `.` or `..`, so no config value can write outside the workdir."""
    if value is not None and (value in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.\-\[\]=,+]+", value)):
        raise ValueError(f"{value!r} must be one plain name (letters, digits, _ . - [ ] = , +), not a path")
    return value


PathSafe = Annotated[str, AfterValidator(_path_safe)]
SEED_LIMIT = 2**63  # torch.manual_seed takes a signed 64-bit integer
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class MethodEntry(Strict):
    """One method of the grid: a registered name, its hyperparameters, and whether tuned values override them."""

    name: str
    label: PathSafe | None = Field(None, description="unique name in tables (default: the method name)")
    params: dict[str, Any] = Field(default_factory=dict, description="hyperparameters, checked by the method")
    tuned: bool = Field(False, description="use the best parameters of `prunebench tune` for this method")
    sweep: dict[str, Any] = Field(default_factory=dict, description="set by a params grid: the knobs this variant "
                                  "fixes (its label is `base[knob=value,...]`); recorded as the run's hp.* columns")

    @model_validator(mode="after")
    def _check_params(self) -> MethodEntry:
        try:
            cls = get_method(self.name)
        except PruneBenchError as err:
            raise ValueError(str(err)) from None
        try:
            cls.Config.model_validate(self.params)
        except ValidationError as err:
            raise ValueError(str(validation_error(err, cls.Config, "params."))) from None
        stray = [k for k, v in self.sweep.items() if k not in self.params or self.params[k] != v]
        if stray:
            raise ValueError(f"sweep: {stray} are not this entry's params (sweep is set by a params grid)")
        return self

    @property
    def key(self) -> str:
        """The row's name in every table, plot, CSV and leaderboard: the label (default: the method name), followed
        by what departs from the published method (`ddp[preset=budget-safe]`, `hard_concrete[overshoot=reset]`)
        where a params grid's label does not already name it."""
        base = self.label or self.name
        config = get_method(self.name).Config.model_validate(self.params)
        extra = {k: v for k, v in config.departures().items() if k not in self.sweep}
        if not extra:
            return base
        shown = ",".join(f"{k}={_shown(v)}" for k, v in sorted(extra.items()))
        return f"{base[:-1]},{shown}]" if self.sweep and base.endswith("]") else f"{base}[{shown}]"


GRID = "grid"


def _is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {GRID}


def _shown(value: Any) -> str:
    """A grid value as it appears in a derived label: YAML's own spelling, without spaces."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip().replace(" ", "")


def expand_grids(methods: Any) -> Any:
    """Method entries whose params hold `{grid: [...]}` values -> one entry per point of the cartesian product of
    those values, labelled `base[knob=value,...]` (knobs sorted) and recording its knobs in `sweep`. Every variant
    is checked against the method's config here, so a bad value is refused with its key path
    (`methods.0.params.mu_end.grid.1: ...`) before anything is written."""
    if not isinstance(methods, list):
        return methods
    out = []
    for i, entry in enumerate(methods):
        params = entry.get("params") if isinstance(entry, dict) else None
        grids = {k: v for k, v in (params or {}).items() if _is_grid(v)} if isinstance(params, dict) else {}
        if not grids:
            out.append(entry)
            continue
        fixed = {k: v for k, v in params.items() if k not in grids}
        cls = _grid_method(entry, i)
        knobs = sorted(grids)
        for knob in knobs:
            values = grids[knob][GRID]
            if not isinstance(values, list) or not values:
                raise ValueError(f"methods.{i}.params.{knob}.grid: expected a non-empty list of values, got {values!r}")
            if len({_shown(v) for v in values}) < len(values):
                raise ValueError(f"methods.{i}.params.{knob}.grid: repeated values {values}")
        base = entry.get("label") or entry["name"]
        for combo in itertools.product(*(grids[k][GRID] for k in knobs)):
            sweep = dict(zip(knobs, combo, strict=True))
            label = f"{base}[{','.join(f'{k}={_shown(v)}' for k, v in sweep.items())}]"
            try:
                cls.Config.model_validate(fixed | sweep)
            except ValidationError as err:
                raise ValueError(_variant_error(err, i, entry["name"], label, grids, sweep)) from None
            out.append(entry | {"label": label, "params": fixed | sweep, "sweep": sweep})
    return out


def _variant_error(err: ValidationError, index: int, method: str, label: str, grids: dict[str, Any],
                   sweep: dict[str, Any]) -> str:
    """The key path of what the method refused: a grid value (`methods.0.params.mu_end.grid.1`), a fixed param, or
    the variant as a whole (knobs valid one by one that clash together)."""
    first = err.errors()[0]
    knob = first["loc"][0] if first["loc"] else None
    msg = first["msg"].removeprefix("Value error, ")
    if knob in sweep:
        j = next(j for j, v in enumerate(grids[knob][GRID]) if _shown(v) == _shown(sweep[knob]))
        return f"methods.{index}.params.{knob}.grid.{j}: {sweep[knob]!r} is refused by {method}: {msg}"
    if knob is not None:
        return f"methods.{index}.params.{pydantic_message(err)}"
    return f"methods.{index}.params: the variant {label} is refused by {method}: {msg}"


def _grid_method(entry: dict[str, Any], index: int) -> Any:
    if "name" not in entry:
        raise ValueError(f"methods.{index}.name: missing (a params grid needs its method)")
    try:
        return get_method(entry["name"])
    except PruneBenchError as err:
        raise ValueError(f"methods.{index}.name: {err}") from None


class SearchDim(Strict):
    """One dimension of an Optuna search space."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchDim:
        if self.type == "categorical" and not self.choices:
            raise ValueError("categorical dimensions need choices")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"{self.type} dimensions need low < high")
        return self


class TuningConfig(Strict):
    methods: list[str] = Field(default_factory=lambda: ["ddp"], description="method labels to tune")
    n_trials: int = Field(10, ge=1, description="trials per (method, model): equal for every tuned method")
    sparsity: float | None = Field(None, gt=0, lt=1, description="sparsity tuned at (default: the first one)")
    search_space: dict[str, dict[str, SearchDim]] = Field(
        default_factory=dict, description="per method label: parameter -> dimension (default: the method's own "
        "space; every mask learner declares one)")
    seed: int = 0
    report_every: int = Field(10, ge=1, description="steps between intermediate losses (MedianPruner)")
    storage: str | None = Field(None, description="Optuna RDB URL the tuning workers share, e.g. "
                                "postgresql://user@host/optuna (default: sqlite in the workdir)")
    heartbeat_s: int = Field(60, ge=1, description="seconds between a running trial's heartbeats; a trial silent "
                             "for three of them (its worker died) is failed and its parameters tried again")
    executor: Literal["local", "ray"] = Field(
        "local", description="run trials in this process, or as Ray tasks (the cluster of `executor.address`, each "
        "task asking `executor.num_cpus`/`num_gpus`) against the shared `storage`")


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite in the workdir)")
    experiment: PathSafe | None = Field(None, description="MLflow experiment (default: the experiment name)")
    store_models: bool = Field(True, description="store the compact checkpoint of a run whose method rewrote "
                               "weights (FLAP, SlimGPT, Týr), so a new evaluation protocol reuses it instead of "
                               "pruning again; false saves the space (a model's size per run)")


class ExecutorConfig(Strict):
    """Where grid points run: in this process, or one Ray task per point on a Ray cluster (`pip install ray`)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="ray: cluster address (`auto`, `ray://host:10001`); None or "
                                "`local` starts a local instance bound to 127.0.0.1")
    num_cpus: float = Field(1, gt=0, description="ray: CPUs each grid point's task asks for (its torch threads)")
    num_gpus: float = Field(0, ge=0, description="ray: GPUs each grid point's task asks for")


class Experiment(Strict):
    """An experiment: the grid models x methods x sparsities x seeds, and how each point is run and recorded."""

    name: PathSafe
    models: list[str] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    sparsities: list[float] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    granularity: Granularity = "kv_group"
    target: TargetConstraints = Field(default_factory=TargetConstraints)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    recovery: RecoverySpec | None = Field(None, description="a fine-tune after pruning, the same for every method: "
                                          "each run records its pruned.* (w/o tune) and recovered.* (w/ tune) metrics")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_runs: int = Field(1000, ge=1, description="a grid with more runs is refused unless `run --yes` (a typo in a "
                          "grid can start weeks of compute)")
    device: str = Field("cpu", description="where to compute: cpu, cuda, cuda:N, mps, or auto (accelerate's "
                        "device_map); offloading methods keep the model in CPU RAM and hold one layer on it")

    _grids = field_validator("methods", mode="before")(expand_grids)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        from suite.model.load import parse_device

        return parse_device(value)

    @field_validator("sparsities")
    @classmethod
    def _sparsity_range(cls, values: list[float]) -> list[float]:
        for v in values:
            if not 0 < v < 1:
                raise ValueError(f"sparsity {v} is outside (0, 1)")
        return values

    def search_spaces(self) -> dict[str, dict[str, SearchDim]]:
        """Per tuned label, its search space (declared, or the method's own `search_space`); one error line for a
        label that is not a method of the experiment, a method without a space, or a dimension that is not one of
        its hyperparameters."""
        entries = {m.key: m for m in self.methods}
        tuning = self.tuning
        unknown = [k for k in tuning.methods if k not in entries]
        if unknown:
            raise ConfigError(f"tuning.methods: {unknown} are not method labels of this experiment "
                              f"({', '.join(entries)})")
        unused = [k for k in tuning.search_space if k not in tuning.methods]
        if unused:
            raise ConfigError(f"tuning.search_space: {unused} are not in tuning.methods ({', '.join(tuning.methods)})")
        spaces = {}
        for label in tuning.methods:
            entry = entries[label]
            method = get_method(entry.name)
            space = tuning.search_space.get(label) or {k: SearchDim(**v) for k, v in method.search_space.items()}
            if not space:
                raise ConfigError(f"tuning.search_space.{label}: no default search space for {entry.name}; "
                                  "declare one")
            fields = method.Config.model_fields
            unknown_params = [p for p in space if p not in fields]
            if unknown_params:
                raise ConfigError(f"tuning.search_space.{label}: {unknown_params} are not {entry.name} "
                                  f"hyperparameters ({', '.join(fields)})")
            spaces[label] = space
        return spaces

    @model_validator(mode="after")
    def _recovery_data(self) -> Experiment:
        if self.recovery is not None:
            try:
                self.recovery.check_data(self.calibration.source, [(p.source, p.split) for p in self.evaluation.ppl])
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> Experiment:
        keys = [m.key for m in self.methods]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"method labels must be unique; repeated: {dupes} (set `label:`)")
        return self


def load_experiment(path: str | Path, overrides: Iterable[str] = ()) -> Experiment:
    """Read, override and validate an experiment YAML; every failure is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return apply_overrides(Experiment, data, overrides, where="")
