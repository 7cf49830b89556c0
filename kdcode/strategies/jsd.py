"""Generalised Jensen-Shannon divergence KD (GKD, Agarwal et al., 2024; MiniLLM's reverse KL, Gu et al., 2024).

With teacher P = softmax(t/T), student Q = softmax(s/T) and the mixture M = beta * P + (1 - beta) * Q:

    JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M)        for 0 < beta < 1
    JSD_0 = KL(P || Q)  (forward KL, as in DistilBERT)      JSD_1 = KL(Q || P)  (reverse KL, mode-seeking)

    L = a_kd * T^2 * JSD_beta + a_clm * CE(s, y)

Frozen teacher (eval mode, no grad).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator

from kdcode.strategies.base import Strategy, TemperatureParams
from kdcode.strategies.losses import causal_ce, masked_mean, shift


class DivergenceParams(TemperatureParams):
    """A divergence on logits at T plus the hard loss (``jsd``, ``reverse-kl``)."""

    temperature: float = Field(1.0, gt=0, description="softmax temperature T (T0 of a schedule)")
    alpha_kd: float = Field(1.0, ge=0, description="weight of the divergence")
    alpha_clm: float = Field(0.0, ge=0, description="weight of the hard causal-LM loss")

    @model_validator(mode="after")
    def _some_weight(self) -> DivergenceParams:
        if self.alpha_kd == 0 and self.alpha_clm == 0:
            raise ValueError("alpha_kd and alpha_clm are both zero: nothing to learn from")
        return self


class JSDParams(DivergenceParams):
    beta: float = Field(0.5, ge=0, le=1, description="0 = forward KL, 1 = reverse KL, between: generalised JSD")


def generalised_jsd(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    s, _, mask = shift(s_logits, labels)
    log_q = torch.log_softmax(s.float() / temperature, dim=-1)
    log_p = torch.log_softmax(t_logits[:, :-1].float() / temperature, dim=-1)
    if beta == 0:
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1:
        div = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        div = beta * kl_pm + (1 - beta) * kl_qm
    return masked_mean(div, mask) * temperature**2


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
        terms["loss"] = p.alpha_kd * terms["jsd"] + p.alpha_clm * terms["hard"]
        return terms
