"""Resolve a model spec (a local directory, or a hub id) to a loaded model and its tokenizer."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from suite.errors import ConfigError, ModelLoadError, PruneBenchError
from suite.hub import hub_unreachable_reason, is_cached, offline, require_hub
from suite.model import zoo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


def parse_dtype(name: str) -> torch.dtype | None:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


DEVICE_HELP = ("where to compute: cpu (default), cuda, cuda:N, mps, or auto (accelerate's device_map over every "
               "visible GPU, spilling to CPU RAM; all CPU where there is no GPU)")


def parse_device(name: str) -> str:
    """`name` if it names a device this machine has (or `auto`), else one ConfigError line saying why."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: no CUDA device here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name}: no MPS device here")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    return name


def compute_device(name: str) -> torch.device:
    """The one device a `--device` value computes on: `auto` is the first GPU, or the CPU without one."""
    if parse_device(name) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def place(model: nn.Module, device: str) -> nn.Module:
    """Put `model` on `device`: moved whole, or for `auto` dispatched by accelerate, whole decoder layers per
    device in order over the visible GPUs with what does not fit left in CPU RAM (a model larger than one GPU)."""
    if parse_device(device) != "auto":
        return model.to(compute_device(device))
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, no_split_module_classes=list(model._no_split_modules or []))
    if set(device_map.values()) <= {"cpu"}:
        return model.to("cpu")  # no GPU: nothing to shard
    return dispatch_model(model, device_map=device_map)


def resolve(spec: str) -> Path | str:
    """A local directory for `zoo:NAME` and path specs, or the hub id itself."""
    if spec.startswith("zoo:"):
        return zoo.resolve(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a model directory (no config.json)")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model directory {spec} does not exist")
    return spec


def quiet_transformers() -> None:
    """transformers' per-load progress bars and advisory logs drown the suite's own progress; keep errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False,
               device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode on `device` (see `place`), tokenizer or None). Pruned checkpoints of any shape load
    through load_pruned (through prunebench's own classes). Code shipped in a checkpoint of a foreign model type
    runs only with `trust_remote_code`; without it transformers refuses at once (no prompt) and that is one line."""
    from suite.model.compact import load_pruned

    quiet_transformers()
    torch_dtype = parse_dtype(dtype)
    parse_device(device)
    where = resolve(spec)
    if isinstance(where, Path):
        try:
            model = load_pruned(where, torch_dtype, trust_remote_code=trust_remote_code)
        except PruneBenchError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
            raise _load_error(f"cannot load model from {where}", err, trust_remote_code) from None
        tokenizer = _tokenizer(str(where), local_only=True)
    else:
        model, tokenizer = _load_hub(where, torch_dtype, trust_remote_code)
    return place(model, device), tokenizer


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec (or None), without loading its weights; a hub id offline uses the cache."""
    where = resolve(spec)
    if isinstance(where, Path):
        return _tokenizer(str(where), local_only=True)
    reason = hub_unreachable_reason()
    with offline() if reason is not None else contextlib.nullcontext():
        return _tokenizer(where, local_only=reason is not None)


def _tokenizer(where: str, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    path = Path(where)
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(where, local_files_only=local_only, trust_remote_code=False)


def _load_hub(model_id: str, dtype: torch.dtype | None, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    """Download (or reuse the cache); with the hub unreachable, a cached copy still loads, anything else fails fast."""
    from transformers import AutoModelForCausalLM

    from suite.model.compact import strict

    reason = hub_unreachable_reason()
    if reason is not None and not is_cached(model_id, "config.json"):
        require_hub(f"model {model_id!r}")
    context = offline() if reason is not None else contextlib.nullcontext()
    try:
        with context:
            model, info = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype or "auto",
                                                               trust_remote_code=trust_remote_code,
                                                               output_loading_info=True)
            strict(info, model_id)
            return model.eval(), _tokenizer(model_id, local_only=reason is not None)
    except (OSError, ValueError) as err:
        raise _load_error(f"cannot load {model_id!r} from the hub", err, trust_remote_code) from None


def check_checkpoint(folder: Path) -> None:
    """Refuse a local checkpoint whose weights would not load, without reading the weights: every safetensors
    file's header must parse and index exactly the bytes the file holds (what the safetensors loader checks), and
    every shard a `model.safetensors.index.json` names must exist. `validate` and `run` call it in their preflight,
    so a truncated download is refused by both with one line before any store is touched."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, AttributeError) as err:
            raise ModelLoadError(f"cannot load model from {folder}: a damaged {index.name}: {err}") from None
        missing = sorted(f for f in shards if not (folder / f).is_file())
        if missing:
            raise ModelLoadError(f"cannot load model from {folder}: {index.name} names missing shard(s) {missing}")
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            try:
                if not 0 < length <= size - 8:
                    raise ValueError(f"the file has {size} bytes, too few for the header it starts with")
                header = json.loads(handle.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise ModelLoadError(f"cannot load model from {folder}: a damaged safetensors file {path.name}: "
                                     f"{str(err).splitlines()[0]}") from None
        if 8 + length + end != size:
            raise ModelLoadError(f"cannot load model from {folder}: a damaged safetensors file {path.name}: its "
                                 f"header indexes {8 + length + end} bytes, the file has {size} (truncated?)")


def _load_error(what: str, err: Exception, trust_remote_code: bool) -> ModelLoadError:
    """One line for a checkpoint that does not load: a damaged weights file, or code it ships that was not trusted."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, SafetensorError):
        first = f"a damaged safetensors file: {first}"
    elif "custom code" in first and not trust_remote_code:
        first = f"{first.split('. ')[0]}; it runs only with --trust-remote-code"
    return ModelLoadError(f"{what}: {first}")
