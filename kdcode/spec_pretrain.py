"""`kdcode pretrain`'s spec: a GPT-2 trained from scratch (how the bundled teacher was made), beside
:mod:`kdcode.spec`, whose data and training sections it shares. Imports neither torch nor any plugin."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from kdcode.spec import DataSpec, TrainSpec, _Spec, _with_budget, build_spec, nest

# `kdcode pretrain`'s training defaults (how the bundled teacher was made); its budget, 1,000 steps, as distil's
DEFAULT_PRETRAIN_TRAIN: dict[str, Any] = {"max_steps": 1000, "lr": 1e-3, "warmup_steps": 100}


class ModelShape(_Spec):
    """A GPT-2 built from scratch by `kdcode pretrain`."""

    layers: int = Field(12, ge=1, description="transformer blocks")
    hidden: int = Field(128, ge=8, description="model width")
    heads: int = Field(4, ge=1, description="attention heads")
    vocab_size: int = Field(8192, ge=300, description="BPE vocabulary size")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class PretrainSpec(_Spec):
    """`kdcode pretrain`: a BPE tokenizer and a GPT-2 trained from scratch (the hard-only loop)."""

    model: ModelShape = Field(default_factory=ModelShape)
    tokenizer: str | None = Field(None, description="reuse this tokenizer folder instead of training one")
    init: str | None = Field(
        None, description="continue training this GPT-2 (folder or 'bundled'): its weights, shape and tokenizer"
    )
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(**DEFAULT_PRETRAIN_TRAIN))
    out: str = Field("pretrained", description="model folder to write")


def resolve_pretrain_spec(overrides: dict[str, Any], where: str) -> PretrainSpec:
    """`kdcode pretrain`'s flags on its defaults; as for distil, its default budget only when none is given."""
    return build_spec(PretrainSpec, _with_budget(nest(overrides), DEFAULT_PRETRAIN_TRAIN), where)
