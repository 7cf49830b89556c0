"""The contract every KD strategy fulfils: its params model, what it needs from the models, its loss.

A strategy's loss is a weighted sum of named terms (:func:`weighted`). The divergences between the teacher's and
the student's distributions live in :mod:`kdcode.strategies.divergences` (reference formulas; the fused pass in
:mod:`kdcode.strategies.fused`, teacher-cache targets in :mod:`kdcode.strategies.sparse`), the other terms in
:mod:`kdcode.strategies.losses`. Weights have one naming in every strategy (:class:`WeightParams`):

    alpha_soft   the divergence between the two models' distributions (forward KL, reverse KL, JSD or TVD)
    alpha_hard   the causal-LM cross-entropy on the data's next tokens
    alpha_cos    1 - cos between last hidden states          alpha_hid / alpha_attn   hidden-state / attention MSE

(docs/strategies.md: which strategy is which terms). A strategy's registry name is its ``name`` (set by the
registry: written once, where it is registered).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdcode.errors import KdcodeDeprecation
from kdcode.strategies.losses import causal_ce, within


class StrategyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemperatureParams(StrategyParams):
    """Softmax temperature of a soft loss, constant or moving linearly from T0 to T1 over training."""

    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft loss (T0 of a schedule)")
    temperature_schedule: Literal["constant", "linear"] = Field("constant", description="constant or linear T0->T1")
    temperature_end: float | None = Field(None, gt=0, description="T1, the temperature at the end of training")

    @model_validator(mode="after")
    def _schedule_complete(self) -> TemperatureParams:
        if self.temperature_schedule == "linear" and self.temperature_end is None:
            raise ValueError("temperature_schedule 'linear' needs temperature_end")
        return self

    def temperature_at(self, progress: float) -> float:
        if self.temperature_schedule == "constant" or self.temperature_end is None:
            return self.temperature
        progress = min(max(progress, 0.0), 1.0)
        return self.temperature + (self.temperature_end - self.temperature) * progress


class WeightParams(TemperatureParams):
    """A soft term at temperature T and the hard loss, weighted ``alpha_soft`` and ``alpha_hard`` (subclasses set
    the defaults and may add ``alpha_*`` weights of their own). ``renamed``: a strategy's old spellings of its
    weights (kdcode <= 0.1.0: ``alpha_ce``/``alpha_kd``/``alpha_tvd`` for the soft weight, ``alpha_clm`` for the hard
    one), which still load with one deprecation line each."""

    renamed: ClassVar[dict[str, str]] = {}

    alpha_soft: float = Field(1.0, ge=0, description="weight of the soft term (the divergence to the teacher)")
    alpha_hard: float = Field(0.5, ge=0, description="weight of the hard causal-LM loss")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.renamed.keys() & data.keys():
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old not in data:
                continue
            if new in data:
                raise ValueError(f"{old} is the old name of {new}; give {new} alone")
            data[new] = data.pop(old)
            warnings.warn(f"strategy param {old} is deprecated: write {new}", KdcodeDeprecation, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _some_weight(self) -> WeightParams:
        weights = [name for name in type(self).model_fields if name.startswith("alpha_")]
        if all(getattr(self, name) == 0 for name in weights):
            both = "both" if len(weights) == 2 else "all"
            raise ValueError(f"{', '.join(weights[:-1])} and {weights[-1]} are {both} zero: nothing to learn from")
        return self


class DivergenceParams(WeightParams):
    """A divergence on logits at T plus the hard loss (``jsd``, ``reverse-kl``)."""

    renamed: ClassVar[dict[str, str]] = {"alpha_kd": "alpha_soft", "alpha_clm": "alpha_hard"}

    temperature: float = Field(1.0, gt=0, description="softmax temperature T (T0 of a schedule)")
    alpha_soft: float = Field(1.0, ge=0, description="weight of the divergence")
    alpha_hard: float = Field(0.0, ge=0, description="weight of the hard causal-LM loss")


def weighted(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``terms`` and ``"loss"`` = sum of ``weights[name] * terms[name]``, added in the order of ``weights``."""
    total: torch.Tensor | None = None
    for name, weight in weights.items():
        total = weight * terms[name] if total is None else total + weight * terms[name]
    assert total is not None
    return {**terms, "loss": total}


class Strategy:
    """A KD strategy: ``loss`` maps the student's (and teacher's) outputs to named loss terms.

    ``loss`` returns a dict whose ``"loss"`` entry is what the student's optimiser minimises; every
    other entry is a logged term. Flags tell the training loop what the strategy needs. Before training, the
    loop tells it the tokenizer's length (:meth:`use_logits`): logits beyond ``vocab`` are LM-head padding
    (Qwen2.5's 151,936 or 152,064 rows for 151,665 tokens) and take part in no loss; :meth:`logits` slices them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    needs_teacher: ClassVar[bool] = True
    needs_teacher_grad: ClassVar[bool] = False
    supports_cache: ClassVar[bool] = False  # can train from a teacher-logit cache (top-k soft targets)

    def __init__(self, params: StrategyParams | None = None, **kwargs: Any) -> None:
        self.params = params if params is not None else self.Params(**kwargs)
        self.vocab: int | None = None  # the tokenizer's length (None: every column of the logits)
        self.chunk: int | None = None  # positions per chunk of the fused KD pass (None: automatic, 0: one pass)

    def use_logits(self, vocab: int | None, chunk: int | None = None) -> None:
        """The run's shared vocabulary (the tokenizer's length) and the fused KD pass's chunk (positions)."""
        self.vocab, self.chunk = vocab, chunk

    def logits(self, out: Any) -> torch.Tensor:
        """``out.logits`` without LM-head padding (a view)."""
        return within(out.logits, self.vocab)

    @property
    def needs_hidden_states(self) -> bool:
        return False

    @property
    def needs_attentions(self) -> bool:
        return False

    def forward_kwargs(self) -> dict[str, bool]:
        """Extra outputs the loss needs from both models' forward passes."""
        kwargs = {}
        if self.needs_hidden_states:
            kwargs["output_hidden_states"] = True
        if self.needs_attentions:
            kwargs["output_attentions"] = True
        return kwargs

    def setup(self, student: Any, teacher: Any | None, layer_map: list[int | None] | None) -> list[torch.nn.Module]:
        """Called once before training; returns extra trainable modules (e.g. projections) to optimise."""
        return []

    def loss(
        self,
        student: Any,
        teacher: Any | None,
        labels: torch.Tensor,
        progress: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def teacher_loss(self, teacher: Any, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's own objective when it trains alongside the student (in-training KD)."""
        return causal_ce(self.logits(teacher), labels)
