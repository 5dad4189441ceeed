"""The grid and its identities: an experiment expands to RunSpecs, and each point's identity is a hash of all
that determines its result (model weights fingerprint, method and resolved hyperparameters, target, seed,
calibration spec and the content hash of its text, the recovery stage and the content hash of its data, evaluation
spec and the content hashes of its texts and task items, and a fingerprint of the code it executes: the version, the
syntax of `suite` and of the method's own modules, docstrings left out).
A FINISHED run with the same identity is never repeated, so a crashed sweep resumes where it stopped."""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import suite
from suite.atomic import within
from suite.data.sources import load_source
from suite.data.tasks import task_dir
from suite.errors import ConfigError
from suite.hashing import digest, json_digest
from suite.methods.pruner import METHOD_PACKAGES, get_method
from suite.model.load import resolve
from suite.run.config import Experiment


@dataclass(frozen=True)
class RunSpec:
    """One grid point, fully resolved."""

    model: str
    label: str
    method: str
    hyperparameters: dict[str, Any]
    sparsity: float
    seed: int
    target: dict[str, Any]
    granularity: str
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    dtype: str
    calibration_data: str = ""  # content hash of the calibration source's splits
    evaluation_data: dict[str, Any] = field(default_factory=dict)  # content hashes of perplexity texts and task items
    code: str = ""  # code_fingerprint(): a fix to a pruner or the suite makes every identity new
    sweep: dict[str, Any] = field(default_factory=dict)  # a params grid's knobs and this point's values
    recovery: dict[str, Any] = field(default_factory=dict)  # RecoverySpec.fingerprint(), {} without a recovery stage
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self, fingerprint: str) -> str:
        """The run: its pruning, its recovery stage (when any) and its evaluation."""
        return json_digest(asdict(self) | {"model_fingerprint": fingerprint})

    def pruning_identity(self, fingerprint: str) -> str:
        """The pruning alone (model, method, hyperparameters, target, seed, calibration and its data, dtype, code): a
        run under a new evaluation protocol, or with another recovery stage, reuses the masks (and rewritten weights)
        of a FINISHED run with it, and recovers from them."""
        body = {k: v for k, v in asdict(self).items() if k not in ("evaluation", "evaluation_data", "recovery")}
        return json_digest(body | {"model_fingerprint": fingerprint})

    @property
    def name(self) -> str:
        return f"{self.model.removeprefix('zoo:')}/{self.label}/sp{self.sparsity}/seed{self.seed}"


def dense_identity(exp: Experiment, model: str, fingerprint: str, evaluation_data: dict[str, Any]) -> str:
    """The dense reference of `model` under this protocol: measured once, then found by this identity."""
    return json_digest({"dense": model, "fp": fingerprint, "eval": exp.evaluation.model_dump(mode="json"),
                        "dtype": exp.dtype, "code": code_fingerprint(), "data": evaluation_data})


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@functools.cache
def source_digest(path: Path) -> str:
    """What a module executes: its syntax tree with every docstring left out (comments and layout never reach the
    tree), so a docstring, comment or formatting edit keeps every identity, and any change to the code does not."""
    tree = ast.parse(_read(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """The code every run executes: the package version and the syntax of every module of `suite` (the engine,
    capture, compaction, evaluation, the runner), docstrings left out. A method's own code is added by
    `method_fingerprint`, so a change to one method renews that method's identities only."""
    h = hashlib.sha256(suite.__version__.encode())
    root = Path(suite.__file__).resolve().parent.parent
    for path in sorted((root / "suite").rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + source_digest(path).encode())
    return f"{suite.__version__}+{h.hexdigest()[:12]}"


def method_modules(name: str) -> list[Path]:
    """The source files of method `name`: the module that registers it, and every module of the method packages
    it imports (the code a run of it executes beyond `suite`)."""
    source = inspect.getsourcefile(get_method(name))
    if source is None:
        return []
    root = Path(suite.__file__).resolve().parent.parent
    seen: list[Path] = []
    todo = [Path(source).resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for node in ast.walk(ast.parse(_read(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for module in names:
                if module.split(".")[0] in METHOD_PACKAGES:
                    found = root / (module.replace(".", "/") + ".py")
                    todo += [found] if found.is_file() else []
    return sorted(seen)


def method_fingerprint(name: str) -> str:
    """`code_fingerprint()`, plus the syntax of the method's own modules (`method_modules`)."""
    h = hashlib.sha256()
    for path in method_modules(name):
        h.update(source_digest(path).encode())
    return f"{code_fingerprint()}+{h.hexdigest()[:12]}"


def data_fingerprint(exp: Experiment) -> tuple[str, dict[str, Any]]:
    """Content hashes of the texts the runs read: the calibration source's splits, and each perplexity window's
    split and each embedded task's items (a hub task: its lm-eval version). Two workers on different interpreters
    (the embedded corpus is the stdlib's source) or on edited data never share a result."""
    import lm_eval

    calibration = load_source(exp.calibration.source)
    text = json.dumps(calibration.hashes, sort_keys=True)
    evaluation: dict[str, Any] = {"ppl": {}, "tasks": {}}
    for p in exp.evaluation.ppl:
        evaluation["ppl"][str(p)] = load_source(p.source).hashes.get(p.split)
    if exp.evaluation.tasks:
        embedded = task_dir("test")[1]
        evaluation["tasks"] = {t: embedded.get(t, f"lm-eval {lm_eval.__version__}") for t in exp.evaluation.tasks}
    return digest(text), evaluation


def model_fingerprint(spec: str) -> str:
    """Content hash of a local checkpoint (config + weights), or the hub id (its cache pins the revision)."""
    where = resolve(spec)
    if not isinstance(where, Path):
        return f"hub:{where}"
    h = hashlib.sha256()
    for path in sorted(where.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin"):
            h.update(path.name.encode())
            if path.stat().st_size < 512 * 2**20:
                h.update(path.read_bytes())
            else:  # multi-GB shards: name, size and mtime stand in for the bytes
                h.update(f"{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tuned_path(workdir: Path, experiment: str, label: str, model: str) -> Path:
    slug = model.replace("/", "_").replace(":", "_")
    return within(workdir, "tuned", experiment, label, f"{slug}.json")


def expand(exp: Experiment, workdir: Path, require_tuned: bool = True,
           data: tuple[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """The grid in a stable order: model, method, sparsity, seed. A `tuned: true` method takes its tuning result's
    best parameters; without one it is refused (`require_tuned`, for run) or keeps its own (for tune, which makes
    them). `data`: `data_fingerprint(exp)`, computed here when not given."""
    calibration_data, evaluation_data = data if data is not None else data_fingerprint(exp)
    specs = []
    for model in exp.models:
        for entry in exp.methods:
            params = dict(entry.params)
            if entry.tuned:
                path = tuned_path(workdir, exp.name, entry.key, model)
                if path.is_file():
                    params |= json.loads(path.read_text())["best_params"]
                elif require_tuned:
                    raise ConfigError(f"methods.{entry.key}: tuned: true but no tuning result for {model} "
                                      f"(run `prunebench tune` first; looked for {path})")
            hyper = get_method(entry.name).Config(**params).model_dump(mode="json")
            recovery = exp.recovery.fingerprint(exp.calibration.source) if exp.recovery is not None else {}
            for sparsity in exp.sparsities:
                for seed in exp.seeds:
                    specs.append(RunSpec(
                        model=model, label=entry.key, method=entry.name, hyperparameters=hyper, sparsity=sparsity,
                        seed=seed, target=exp.target.model_dump(mode="json") | {"sparsity": sparsity},
                        granularity=exp.granularity, calibration=exp.calibration.model_dump(mode="json"),
                        evaluation=exp.evaluation.model_dump(mode="json"), dtype=exp.dtype,
                        calibration_data=calibration_data, evaluation_data=evaluation_data,
                        code=method_fingerprint(entry.name), sweep=dict(entry.sweep), recovery=recovery,
                    ))
    return specs
