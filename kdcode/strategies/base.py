"""The contract every KD strategy fulfils, and the loss terms they share.

All losses work on causal-LM outputs: position t predicts token t+1, and labels equal to -100 are
ignored. Each term is a mean over the predicted (unmasked) positions.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

IGNORE = -100


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


class Strategy:
    """A KD strategy: ``loss`` maps the student's (and teacher's) outputs to named loss terms.

    ``loss`` returns a dict whose ``"loss"`` entry is what the student's optimiser minimises; every
    other entry is a logged term. Flags tell the training loop what the strategy needs.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    needs_teacher: ClassVar[bool] = True
    needs_teacher_grad: ClassVar[bool] = False
    supports_cache: ClassVar[bool] = False  # can train from a teacher-logit cache (top-k soft targets)

    def __init__(self, params: StrategyParams | None = None, **kwargs: Any) -> None:
        self.params = params if params is not None else self.Params(**kwargs)

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
        return causal_ce(teacher.logits, labels)


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align predictions with next tokens: (logits[:, :-1], labels[:, 1:], mask of counted positions)."""
    logits = logits[:, :-1]
    target = labels[:, 1:]
    return logits, target, target != IGNORE


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard loss: cross-entropy of the next token, mean over counted positions."""
    logits, target, _ = shift(logits, labels)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=IGNORE)


def soft_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over counted positions (Hinton et al., 2015)."""
    s, _, mask = shift(s_logits, labels)
    t = t_logits[:, :-1]
    log_ps = F.log_softmax(s.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def cosine_hidden(h_s: torch.Tensor, h_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_s, h_t) between last hidden states, mean over counted positions (DistilBERT)."""
    if h_s.size(-1) != h_t.size(-1):
        raise ValueError(f"the cosine loss needs equal widths, got student {h_s.size(-1)} and teacher {h_t.size(-1)}")
    _, _, mask = shift(h_s, labels)
    cos = F.cosine_similarity(h_s[:, :-1].float(), h_t[:, :-1].float(), dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)
