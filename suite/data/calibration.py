"""Calibration batches: seeded windows of a text source's split, plus held-out windows and task items for margin
objectives, each batch with a content hash so two runs can prove they calibrated on the same tokens."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from suite.data.sources import TextSource, load_source, token_stream
from suite.data.tasks import margin_set
from suite.errors import DataError


@dataclass(frozen=True)
class Calibration:
    """Calibration token ids [n, seq_len] (+ held-out `valid_ids`, + task choice sequences with signed answer-token
    weights for margin objectives), the spec that made them and a content hash over all of it."""

    input_ids: Tensor
    spec: str
    content_hash: str
    valid_ids: Tensor | None = None
    margin: tuple[Tensor, Tensor] | None = None  # (ids [m, seq_len], weights [m, seq_len - 1]): suite.data.tasks

    @classmethod
    def from_ids(cls, input_ids: Tensor, spec: str, valid_ids: Tensor | None = None,
                 margin: tuple[Tensor, Tensor] | None = None) -> Calibration:
        ids = input_ids.to(torch.int64).contiguous()
        h = hashlib.sha256(ids.numpy().tobytes() + str(tuple(ids.shape)).encode())
        if valid_ids is not None:
            valid_ids = valid_ids.to(torch.int64).contiguous()
            h.update(valid_ids.numpy().tobytes())
        if margin is not None:
            for part in margin:
                h.update(part.contiguous().numpy().tobytes())
        return cls(ids, spec, h.hexdigest()[:16], valid_ids, margin)

    def batches(self, batch_size: int) -> list[Tensor]:
        return list(self.input_ids.split(batch_size))


def windows(source: TextSource, split: str, tokenizer: Any, n: int, seq_len: int, seed: int) -> Tensor:
    """n windows of seq_len tokens at seeded random offsets of a split's token stream [n, seq_len]."""
    stream = token_stream(source, split, tokenizer)
    if len(stream) < seq_len + 1:
        raise DataError(f"{source.name}:{split} has {len(stream)} tokens, fewer than seq_len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def calibration(
    source: TextSource, tokenizer: Any, n: int, seq_len: int, seed: int = 0, split: str = "train",
    valid_n: int = 0, valid_split: str = "valid",
) -> Calibration:
    """n random windows of seq_len tokens from a split, drawn with a seeded generator, plus `valid_n` held-out
    windows from `valid_split` (what tuning and the mismatch diagnostic score; never the test split)."""
    ids = windows(source, split, tokenizer, n, seq_len, seed)
    valid = windows(source, valid_split, tokenizer, valid_n, seq_len, seed) if valid_n else None
    spec = f"{source.name}:{split}@{source.hashes[split]}:n={n}:seq_len={seq_len}:seed={seed}"
    if valid_n:
        spec += f"+{valid_split}@{source.hashes[valid_split]}:n={valid_n}"
    return Calibration.from_ids(ids, spec, valid)


class CalibrationSpec(BaseModel):
    """Which calibration text a run uses; identical for every method on the same model (same content hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("embedded", description="embedded, wikitext2, c4, ptb, or a local file/folder")
    split: str = Field("train", description="split the calibration windows come from")
    n: int = Field(64, ge=1, description="calibration sequences")
    seq_len: int = Field(256, ge=2, description="tokens per sequence")
    valid_n: int = Field(16, ge=0, description="held-out sequences (tuning objective, mismatch diagnostic)")
    valid_split: str = Field("valid", description="split the held-out sequences come from (never test)")
    seed: int = Field(0, description="seed of the window sampling; a run with seed s draws with seed + s")
    fixed_draw: bool = Field(False, description="every run seed uses the same draw (`seed`), so seed-to-seed spread "
                             "leaves out the variance of the calibration sample; default: each run seed draws its own")
    tasks: tuple[str, ...] = Field((), description="embedded tasks whose train items feed margin objectives (GISP)")
    task_items: int = Field(32, ge=1, description="train items per task for margin objectives")

    def draw_seed(self, run_seed: int = 0) -> int:
        """The window-sampling seed of a run with seed `run_seed`: its own draw, unless `fixed_draw`."""
        return self.seed if self.fixed_draw else self.seed + run_seed

    def build(self, tokenizer: Any, run_seed: int = 0) -> Calibration:
        """The calibration sample of a run with seed `run_seed` (`draw_seed`)."""
        if self.valid_split == "test":
            raise DataError("calibration.valid_split: the test split is reserved for evaluation")
        cal = calibration(load_source(self.source), tokenizer, self.n, self.seq_len, self.draw_seed(run_seed),
                          self.split, self.valid_n, self.valid_split)
        if not self.tasks:
            return cal

        margin = margin_set(tokenizer, list(self.tasks), self.task_items, self.seq_len)
        spec = f"{cal.spec}+tasks:{','.join(self.tasks)}:train:n={self.task_items}"
        return Calibration.from_ids(cal.input_ids, spec, cal.valid_ids, margin)
