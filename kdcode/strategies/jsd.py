"""Generalised Jensen-Shannon divergence KD (GKD, Agarwal et al., 2024; MiniLLM's reverse KL, Gu et al., 2024).

With teacher P = softmax(t/T), student Q = softmax(s/T) and the mixture M = beta * P + (1 - beta) * Q:

    JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M)        for 0 < beta < 1
    JSD_0 = KL(P || Q)  (forward KL, as in DistilBERT)      JSD_1 = KL(Q || P)  (reverse KL, mode-seeking)

    L = a_soft * T^2 * JSD_beta + a_hard * CE(s, y)

(:func:`kdcode.strategies.divergences.generalised_jsd`, in its autograd form). Frozen teacher (eval mode, no grad).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcode.strategies.base import DivergenceParams, Strategy, weighted
from kdcode.strategies.divergences import generalised_jsd
from kdcode.strategies.losses import causal_ce


class JSDParams(DivergenceParams):
    beta: float = Field(0.5, ge=0, le=1, description="0 = forward KL, 1 = reverse KL, between: generalised JSD")


class JSDKD(Strategy):
    summary = "generalised JSD on logits (beta 0 = forward KL, 1 = reverse KL; GKD/MiniLLM) + hard CE"
    Params = JSDParams
    params: JSDParams

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        p = self.params
        assert teacher is not None, "jsd needs teacher outputs"
        s = self.logits(student)
        terms = {
            "jsd": generalised_jsd(s, self.logits(teacher).detach(), labels, p.beta, p.temperature_at(progress)),
            "hard": causal_ce(s, labels),
        }
        return weighted(terms, {"jsd": p.alpha_soft, "hard": p.alpha_hard})
