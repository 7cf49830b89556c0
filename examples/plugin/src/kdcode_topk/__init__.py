"""A third-party KD strategy for kdcode: KL on the teacher's top-k tokens only.

The teacher distribution is renormalised over its k most likely tokens at each position (the rest of
the vocabulary is treated as impossible) and the student is pulled towards it:

    L = a_soft * T^2 * sum_{i in topk(t)} p_i (log p_i - log q_i) + a_hard * CE(s, y)

with p = softmax over the teacher's top-k logits / T and q = the student's softmax(s/T) on those
ids, renormalised over them too. Installed with `pip install examples/plugin`, it shows up in
`kdcode list` and is used as `strategy: {name: topk-kl, params: {k: 8}}`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcode.strategies.base import Strategy, StrategyParams, weighted
from kdcode.strategies.divergences import kl
from kdcode.strategies.losses import causal_ce, masked_mean, shift


class TopKParams(StrategyParams):
    k: int = Field(8, ge=1, description="teacher tokens kept per position")
    temperature: float = Field(1.0, gt=0, description="softmax temperature")
    alpha_soft: float = Field(0.5, ge=0, description="weight of the top-k KL (kdcode's name for a soft-term weight)")
    alpha_hard: float = Field(0.5, ge=0, description="weight of the hard loss")


class TopKKL(Strategy):
    summary = "KL on the teacher's top-k tokens, renormalised (example plugin)"
    Params = TopKParams
    params: TopKParams

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        p = self.params
        logits = self.logits(student)  # the tokenizer's columns: LM-head padding left out
        s, _, mask = shift(logits, labels)
        t = self.logits(teacher)[:, :-1].detach().float()
        top = t.topk(min(p.k, t.size(-1)), dim=-1)
        log_p = torch.log_softmax(top.values / p.temperature, dim=-1)
        log_q = torch.log_softmax(s.float().gather(-1, top.indices) / p.temperature, dim=-1)
        terms = {
            "topk_kl": masked_mean(kl(log_p, log_q), mask) * p.temperature**2,
            "hard": causal_ce(logits, labels),
        }
        return weighted(terms, {"topk_kl": p.alpha_soft, "hard": p.alpha_hard})
