"""Sparse soft targets from a teacher-logit cache (:mod:`kdcode.train.teacher_cache`).

Per position the cache keeps the teacher's top-k logits, their ids and ``lse = logsumexp(t/T)`` over the
whole vocabulary at the cache temperature T. The teacher's soft targets at T are then exact on the top k,
and the rest of its mass is one bucket, ``rest = 1 - sum_k softmax(t/T)_k``; a divergence against them is the
divergence between those k + 1 buckets and the student's (:func:`kdcode.strategies.divergences.buckets`), e.g.

    KL_sparse = sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest),   times T^2

With k = vocabulary size it equals the full divergence. The KLs run in the fused pass
(:func:`kdcode.strategies.divergences.kd_terms`), the TVD as :func:`kdcode.strategies.divergences.sparse_tvd`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseTargets:
    """Cached teacher soft targets for a batch: [B, T, K] logits and ids, [B, T] logsumexp at T."""

    topk_logits: torch.Tensor
    topk_ids: torch.Tensor
    lse: torch.Tensor
    temperature: float

    def to(self, device: torch.device) -> SparseTargets:
        return SparseTargets(
            self.topk_logits.to(device), self.topk_ids.to(device), self.lse.to(device), self.temperature
        )
