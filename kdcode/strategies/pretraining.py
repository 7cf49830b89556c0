"""Pre-training KD with a frozen teacher: DistilBERT (Sanh et al., 2019) and DistilGPT2.

    L = a_soft * T^2 * KL(softmax(t/T) || softmax(s/T)) + a_hard * CE(s, y) + a_cos * (1 - cos(h_s, h_t))

(the paper's a_ce, a_clm and a_cos). The teacher is in eval mode and gets no gradient. Defaults follow DistilGPT2
(T=2, a_soft=a_hard=0.5); the cosine term (DistilBERT's a_cos) compares last hidden states and needs equal widths.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from kdcode.errors import KdcodeError
from kdcode.strategies.base import Strategy, WeightParams, weighted
from kdcode.strategies.divergences import kd_terms
from kdcode.strategies.losses import cosine_hidden


class DistilParams(WeightParams):
    renamed: ClassVar[dict[str, str]] = {"alpha_ce": "alpha_soft", "alpha_clm": "alpha_hard"}

    alpha_soft: float = Field(0.5, ge=0, description="weight of the soft loss: T^2 KL(teacher || student)")
    alpha_hard: float = Field(0.5, ge=0, description="weight of the hard causal-LM loss")
    alpha_cos: float = Field(0.0, ge=0, description="weight of the hidden-state cosine loss")


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
        soft, hard = kd_terms(student.logits, teacher, labels, p.temperature_at(progress), self.vocab, self.chunk)
        terms = {"soft": soft, "hard": hard}
        weights = {"soft": p.alpha_soft, "hard": p.alpha_hard}
        if p.alpha_cos > 0:
            if not hasattr(teacher, "hidden_states"):
                raise KdcodeError("alpha_cos needs the live teacher's hidden states; a teacher cache has none")
            terms["cos"] = cosine_hidden(student.hidden_states[-1], teacher.hidden_states[-1].detach(), labels)
            weights["cos"] = p.alpha_cos
        return weighted(terms, weights)
