"""Pre-training KD with a frozen teacher: DistilBERT (Sanh et al., 2019) and DistilGPT2.

    L = a_ce * T^2 * KL(softmax(t/T) || softmax(s/T)) + a_clm * CE(s, y) + a_cos * (1 - cos(h_s, h_t))

The teacher is in eval mode and gets no gradient. Defaults follow DistilGPT2 (T=2, a_ce=a_clm=0.5);
the cosine term (DistilBERT's a_cos) compares last hidden states and needs equal widths.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from kdcode.errors import KdcodeError
from kdcode.strategies.base import Strategy, TemperatureParams
from kdcode.strategies.fused import dense_kd_terms
from kdcode.strategies.losses import cosine_hidden


class DistilParams(TemperatureParams):
    alpha_ce: float = Field(0.5, ge=0, description="weight of the soft (KL) loss")
    alpha_clm: float = Field(0.5, ge=0, description="weight of the hard causal-LM loss")
    alpha_cos: float = Field(0.0, ge=0, description="weight of the hidden-state cosine loss")

    @model_validator(mode="after")
    def _some_weight(self) -> DistilParams:
        if self.alpha_ce == 0 and self.alpha_clm == 0 and self.alpha_cos == 0:
            raise ValueError("alpha_ce, alpha_clm and alpha_cos are all zero: nothing to learn from")
        return self


class PretrainingKD(Strategy):
    summary = "DistilBERT/DistilGPT2 KD: soft KL (T^2-scaled) + hard CE (+ cosine); frozen teacher"
    Params = DistilParams
    params: DistilParams
    supports_cache = True

    @property
    def needs_hidden_states(self) -> bool:
        return self.params.alpha_cos > 0

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        p = self.params
        assert teacher is not None, "pretraining KD needs teacher outputs"
        soft, hard = logit_terms(student.logits, teacher, labels, p.temperature_at(progress), self.vocab, self.chunk)
        terms: dict[str, torch.Tensor] = {"soft": soft, "hard": hard}
        total = p.alpha_ce * terms["soft"] + p.alpha_clm * terms["hard"]
        if p.alpha_cos > 0:
            if not hasattr(teacher, "hidden_states"):
                raise KdcodeError("alpha_cos needs the live teacher's hidden states; a teacher cache has none")
            terms["cos"] = cosine_hidden(student.hidden_states[-1], teacher.hidden_states[-1].detach(), labels)
            total = total + p.alpha_cos * terms["cos"]
        terms["loss"] = total
        return terms


def logit_terms(
    s_logits: torch.Tensor,
    teacher: Any,
    labels: torch.Tensor,
    temperature: float,
    vocab: int | None = None,
    chunk: int | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft KL, hard CE) in one fused pass over the first ``vocab`` tokens: against a live teacher's logits or
    cached top-k soft targets, ``chunk`` positions at a time (:mod:`kdcode.strategies.fused`); ``reverse``: the
    soft term is KL(student || teacher)."""
    from kdcode.strategies.sparse import SparseTargets, sparse_kd_terms

    if isinstance(teacher, SparseTargets):
        return sparse_kd_terms(s_logits, teacher, labels, temperature, vocab, chunk, reverse)
    return dense_kd_terms(s_logits, teacher.logits, labels, temperature, vocab, chunk, reverse)
