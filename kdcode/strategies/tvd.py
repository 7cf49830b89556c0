"""Total variation distance KD, for a student that will serve as a speculative-decoding draft (DistillSpec,
Zhou et al., 2024): when the target verifies a sampled draft token, the chance it is accepted is
``1 - TVD(p, q)`` (Leviathan et al., 2023), so minimising the TVD is minimising rejections.

    L = a_tvd * TVD(softmax(t/T), softmax(s/T)) + a_clm * CE(s, y),    TVD(p, q) = 1/2 sum_j |p_j - q_j|

Frozen teacher, T=1 by default (the temperature drafts are sampled at). From a teacher cache the TVD is taken
over the teacher's top k tokens plus one bucket for the rest of the vocabulary (a lower bound of the full TVD,
exact when k is the vocabulary).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcode.strategies.base import Strategy, TemperatureParams
from kdcode.strategies.losses import causal_ce, masked_mean, shift


class TVDParams(TemperatureParams):
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of both distributions")
    alpha_tvd: float = Field(1.0, ge=0, description="weight of the total variation distance")
    alpha_clm: float = Field(0.5, ge=0, description="weight of the hard causal-LM loss")


def tvd_dense(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """TVD between the teacher's and the student's softmax at T, mean over counted positions."""
    s, _, mask = shift(s_logits, labels)
    q = torch.softmax(s.float() / temperature, dim=-1)
    p = torch.softmax(t_logits[:, :-1].float() / temperature, dim=-1)
    return masked_mean(0.5 * (p - q).abs().sum(-1), mask)


def tvd_sparse(s_logits: torch.Tensor, targets: Any, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """TVD over the teacher's cached top-k tokens and one rest bucket, mean over counted positions."""
    s, _, mask = shift(s_logits, labels)
    q = torch.softmax(s.float() / temperature, dim=-1)
    ids = targets.topk_ids[:, :-1].long()
    p_k = torch.exp(targets.topk_logits[:, :-1].float() / temperature - targets.lse[:, :-1].float()[..., None])
    q_k = q.gather(-1, ids)
    rest = ((1 - p_k.sum(-1)).clamp(min=0) - (1 - q_k.sum(-1)).clamp(min=0)).abs()
    return masked_mean(0.5 * ((p_k - q_k).abs().sum(-1) + rest), mask)


class TVDKD(Strategy):
    summary = "total variation distance to the teacher (+ hard CE): what speculative-draft acceptance depends on"
    Params = TVDParams
    params: TVDParams
    supports_cache = True

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        from kdcode.strategies.sparse import SparseTargets

        p = self.params
        assert teacher is not None, "tvd needs teacher outputs"
        temperature = p.temperature_at(progress)
        s = self.logits(student)  # the tokenizer's tokens: LM-head padding is no token either model can draft
        if isinstance(teacher, SparseTargets):
            tvd = tvd_sparse(s, teacher, labels, temperature)
        else:
            tvd = tvd_dense(s, self.logits(teacher).detach(), labels, temperature)
        terms = {"tvd": tvd, "hard": causal_ce(s, labels)}
        terms["loss"] = p.alpha_tvd * terms["tvd"] + p.alpha_clm * terms["hard"]
        return terms
