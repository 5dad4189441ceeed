"""What a recovery stage is: its settings (validated, one error line per bad key) and the data it may read.

Light on purpose (pydantic only): experiment configs import it; the training lives in `suite.recovery.train`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from suite.data.sources import load_source
from suite.errors import ConfigError, DataError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DISTILL_ONLY = ("temperature", "lm_weight", "distill_weights")


class RecoveryData(BaseModel):
    """Where recovery's tokens come from: windows of a text source's split, drawn once with a fixed seed, so every
    method of an experiment trains on the same ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = Field(None, description="text source (default: the experiment's calibration source)")
    split: str = Field("train", description="split the windows come from (never test, nor one an evaluation "
                       "perplexity reads)")
    n: int = Field(512, ge=1, description="windows of seq_len tokens; steps cycle through them in a seeded order")
    seed: int = Field(0, ge=0, description="seed of the window sampling (the run's seed orders and initialises)")


class RecoverySpec(BaseModel):
    """A short fine-tune after pruning, identical for every method of an experiment (LLM-Pruner's "w/ tune")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["lora", "full", "distill"] = Field(
        "lora", description="lora: LoRA adapters (peft), LM loss, merged; full: every weight, LM loss; distill: KL "
        "to the dense model's logits (+ lm_weight x LM loss), through LoRA or every weight (distill_weights)")
    steps: int = Field(200, ge=1, description="optimiser steps")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW; linear warmup, cosine decay)")
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the steps the learning rate warms up over")
    batch_size: int = Field(8, ge=1, description="windows per step")
    micro_batch_size: int | None = Field(None, ge=1, description="windows per forward pass (default batch_size); "
                                         "must divide batch_size")
    seq_len: int = Field(256, ge=2, description="tokens per window")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (not on fused expert weights)")
    target_modules: tuple[Projection, ...] = Field(PROJECTIONS, min_length=1, description="projections LoRA "
                                                   "adapts (gate/up/down also adapt the experts of MoE layers)")
    temperature: float = Field(1.0, gt=0, description="distill: softmax temperature of both models' logits")
    lm_weight: float = Field(0.0, ge=0, description="distill: weight of the LM loss added to the KL")
    distill_weights: Literal["lora", "full"] = Field("lora", description="distill: train LoRA adapters or every "
                                                     "weight")
    data: RecoveryData = Field(default_factory=RecoveryData)

    @model_validator(mode="after")
    def _check(self) -> RecoverySpec:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size: {self.micro_batch_size} does not divide batch_size {self.batch_size}")
        if self.method != "distill":
            stray = sorted(k for k in DISTILL_ONLY if k in self.model_fields_set)
            if stray:
                raise ValueError(f"{stray[0]}: only applies to method distill (method is {self.method})")
        if self.data.split == "test":
            raise ValueError("data.split: the test split is reserved for evaluation")
        return self

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora" or (self.method == "distill" and self.distill_weights == "lora")

    def source(self, calibration_source: str) -> str:
        return self.data.source or calibration_source

    def check_data(self, calibration_source: str, evaluated: list[tuple[str, str]]) -> None:
        """Refuse recovery data an evaluation reads: `evaluated` holds the (source, split) of every perplexity."""
        source = self.source(calibration_source)
        if (source, self.data.split) in evaluated:
            raise ConfigError(f"recovery.data: {source}:{self.data.split} is evaluation data (an evaluation "
                              "perplexity reads it); recover on a train split")

    def fingerprint(self, calibration_source: str) -> dict[str, Any]:
        """The spec as recorded and hashed into a run's identity: every setting, the resolved source, and the
        content hash of the split the windows come from."""
        source = self.source(calibration_source)
        hashes = load_source(source).hashes
        if self.data.split not in hashes:
            raise DataError(f"recovery.data.split: {source} has no split {self.data.split!r} ({', '.join(hashes)})")
        body = self.model_dump(mode="json")
        body["data"] |= {"source": source, "split_hash": hashes[self.data.split]}
        return body


