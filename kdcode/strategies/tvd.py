"""Total variation distance KD, for a student that will serve as a speculative-decoding draft (DistillSpec,
Zhou et al., 2024): when the target verifies a sampled draft token, the chance it is accepted is
``1 - TVD(p, q)`` (Leviathan et al., 2023), so minimising the TVD is minimising rejections.

    L = a_soft * TVD(softmax(t/T), softmax(s/T)) + a_hard * CE(s, y),    TVD(p, q) = 1/2 sum_j |p_j - q_j|

Frozen teacher, T=1 by default (the temperature drafts are sampled at). From a teacher cache the TVD is taken
over the teacher's top k tokens plus one bucket for the rest of the vocabulary (a lower bound of the full TVD,
exact when k is the vocabulary): :func:`kdcode.strategies.divergences.tvd` and ``sparse_tvd``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from kdcode.strategies.base import Strategy, WeightParams, weighted
from kdcode.strategies.divergences import sparse_tvd, tvd
from kdcode.strategies.losses import causal_ce
from kdcode.strategies.sparse import SparseTargets


class TVDParams(WeightParams):
    renamed: ClassVar[dict[str, str]] = {"alpha_tvd": "alpha_soft", "alpha_clm": "alpha_hard"}

    temperature: float = Field(1.0, gt=0, description="softmax temperature T of both distributions")
    alpha_soft: float = Field(1.0, ge=0, description="weight of the total variation distance")
    alpha_hard: float = Field(0.5, ge=0, description="weight of the hard causal-LM loss")


class TVDKD(Strategy):
    summary = "total variation distance to the teacher (+ hard CE): what speculative-draft acceptance depends on"
    Params = TVDParams
    params: TVDParams
    supports_cache = True

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        p = self.params
        assert teacher is not None, "tvd needs teacher outputs"
        temperature = p.temperature_at(progress)
        s = self.logits(student)  # the tokenizer's tokens: LM-head padding is no token either model can draft
        if isinstance(teacher, SparseTargets):
            soft = sparse_tvd(s, teacher, labels, temperature)
        else:
            soft = tvd(s, self.logits(teacher).detach(), labels, temperature)
        return weighted({"tvd": soft, "hard": causal_ce(s, labels)}, {"tvd": p.alpha_soft, "hard": p.alpha_hard})
