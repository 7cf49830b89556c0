"""Sparse soft targets from a teacher-logit cache (:mod:`kdcode.train.teacher_cache`), and the KL against them.

Per position the cache keeps the teacher's top-k logits, their ids and ``lse = logsumexp(t/T)`` over the
whole vocabulary at the cache temperature T. The teacher's soft targets at T are then exact on the top k,
and the rest of its mass is one bucket, ``rest = 1 - sum_k softmax(t/T)_k``:

    KL_sparse = sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest),   times T^2

where q is the student's softmax(s/T) gathered on the teacher's top-k ids and q_rest its remaining mass.
With k = vocabulary size it equals the full KL. Soft and hard terms are one fused pass
(:func:`kdcode.strategies.fused.sparse_kd_terms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdcode.errors import KdcodeError
from kdcode.strategies.fused import sparse_kd_terms as fused


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


def sparse_kl(s_logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL over the teacher's top-k buckets plus one 'rest' bucket, mean over counted positions."""
    return sparse_kd_terms(s_logits, targets, labels, temperature)[0]


def sparse_kd_terms(
    s_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    temperature: float,
    vocab: int | None = None,
    chunk: int | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse KL as in :func:`sparse_kl`, hard next-token CE) over the first ``vocab`` tokens, fused and chunked
    (:mod:`kdcode.strategies.fused`); ``reverse``: the buckets' reverse KL(q || p)."""
    if not math.isclose(temperature, targets.temperature, rel_tol=1e-6):
        raise KdcodeError(
            f"the teacher cache holds soft targets at T={targets.temperature}, the strategy asks for "
            f"T={temperature}; pass --temperature {targets.temperature} or rebuild the cache"
        )
    return fused(
        s_logits, targets.topk_logits, targets.topk_ids, targets.lse, labels, temperature, vocab, chunk, reverse
    )
