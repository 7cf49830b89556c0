"""The divergences between the teacher's and the student's next-token distributions, each written once.

At every predicting position (position t predicts token t+1; labels equal to -100 are not counted) the teacher's
distribution is P = softmax(t/T) and the student's Q = softmax(s/T), over the tokenizer's tokens. Each loss below is
a divergence per position, then :func:`~kdcode.strategies.losses.masked_mean` over the counted positions:

    forward_kl        T^2 KL(P || Q)            Hinton et al. 2015; DistilBERT/DistilGPT2 (Sanh et al. 2019)
    reverse_kl        T^2 KL(Q || P)            MiniLLM (Gu et al. 2024): mode-seeking
    generalised_jsd   T^2 JSD_beta(P || Q)      GKD (Agarwal et al. 2024); beta 0 and 1 are the two KLs above
    tvd               TVD(P, Q)                 DistillSpec (Zhou et al. 2024): 1 - TVD is a draft's acceptance

These functions are the *reference* forms: plain autograd, float32, one log-softmax each. What training runs is
one of two other forms, each tested against these (values and gradients; tests/test_divergences.py):

- fused (:mod:`kdcode.strategies.fused`): forward or reverse KL together with the hard CE in one pass over the
  vocabulary, chunked along the sequence, with hand-written gradients. Against the reference: values and
  gradients within 1e-6 absolute (float32 over a 50-token vocabulary; only the order of the float sums differs);
  chunked equals unchunked bit for bit.
- sparse (a teacher cache, :class:`~kdcode.strategies.sparse.SparseTargets`): the teacher is known on its top k
  tokens only, plus ``lse = logsumexp(t/T)``, so the divergence is taken between *bucket* distributions: the k
  tokens, then one bucket holding the rest of the vocabulary (:func:`buckets`). That is the same formula over
  k + 1 outcomes (a lower bound of the full divergence, by the data-processing inequality; exact when k is the
  vocabulary). The fused sparse KLs and :func:`sparse_tvd` are tested against the per-position formulas here
  applied to the buckets: within 1e-5 (the rest bucket is 1 - sum of k probabilities, a cancellation).

:func:`kd_terms` is what the KL strategies call: the fused (soft, hard) pair against a live teacher or a cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kdcode.errors import KdcodeError
from kdcode.strategies.fused import dense_kd_terms, sparse_kd_terms
from kdcode.strategies.losses import masked_mean, shift
from kdcode.strategies.sparse import SparseTargets

# ----------------------------------------------------------------------------------- per-position formulas


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) = sum_j a_j (log a_j - log b_j) over the last dimension, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, over the last
    dimension; beta 0 is KL(P || Q) and beta 1 is KL(Q || P) (the convention of GKD's implementation in TRL)."""
    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TVD(P, Q) = 1/2 sum_j |p_j - q_j| over the last dimension, from probabilities."""
    return 0.5 * (p - q).abs().sum(-1)


# ----------------------------------------------------------------------------------- reference losses


def _log_probs(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(log P, log Q, mask) at the predicting positions: log_softmax(t/T), log_softmax(s/T) in float32."""
    s, _, mask = shift(s_logits, labels)
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_p = F.log_softmax(t_logits[:, :-1].float() / temperature, dim=-1)
    return log_p, log_q, mask


def forward_kl(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), mean over counted positions: the soft loss of Hinton et al. (2015),
    "Distilling the Knowledge in a Neural Network", as DistilBERT/DistilGPT2 use it (Sanh et al. 2019). The T^2 keeps
    the gradient's scale independent of T (it is T (q - p) per logit). Mass-covering: the student is pulled onto
    every token the teacher gives mass to."""
    log_p, log_q, mask = _log_probs(s_logits, t_logits, labels, temperature)
    return masked_mean(kl(log_p, log_q), mask) * temperature**2


def reverse_kl(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 KL(softmax(s/T) || softmax(t/T)), mean over counted positions: MiniLLM's divergence (Gu et al. 2024,
    "MiniLLM: Knowledge Distillation of Large Language Models"). Mode-seeking: a small student fits the teacher's
    likely tokens instead of spreading its mass over the teacher's whole, flat distribution."""
    log_p, log_q, mask = _log_probs(s_logits, t_logits, labels, temperature)
    return masked_mean(kl(log_q, log_p), mask) * temperature**2


def generalised_jsd(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """T^2 JSD_beta(softmax(t/T) || softmax(s/T)), mean over counted positions (:func:`jsd`): the generalised
    Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"). It moves
    from the forward KL (beta 0) to the reverse KL (beta 1); beta 1/2 is the Jensen-Shannon divergence."""
    log_p, log_q, mask = _log_probs(s_logits, t_logits, labels, temperature)
    return masked_mean(jsd(log_p, log_q, beta), mask) * temperature**2


def tvd(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """TVD(softmax(t/T), softmax(s/T)), mean over counted positions (no T^2: a TVD is bounded by 1 at any T).
    DistillSpec (Zhou et al. 2024): a target model accepts a draft's sampled token with probability 1 - TVD
    (Leviathan et al. 2023), so a draft trained on it is rejected least."""
    s, _, mask = shift(s_logits, labels)
    q = torch.softmax(s.float() / temperature, dim=-1)
    p = torch.softmax(t_logits[:, :-1].float() / temperature, dim=-1)
    return masked_mean(tv(p, q), mask)


# ----------------------------------------------------------------------------------- sparse (teacher cache) forms


def buckets(s_logits: torch.Tensor, targets: Any, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) over k + 1 buckets at the predicting positions: the teacher's top-k tokens, then the rest of the
    vocabulary (1 - the top k's mass, clamped at 0). The sparse forms are the formulas above over these."""
    s = s_logits[:, :-1].float()
    q = torch.softmax(s / temperature, dim=-1).gather(-1, targets.topk_ids[:, :-1].long())
    p = torch.exp(targets.topk_logits[:, :-1].float() / temperature - targets.lse[:, :-1].float()[..., None])
    rest = [(1 - x.sum(-1, keepdim=True)).clamp(min=0) for x in (p, q)]
    return torch.cat([p, rest[0]], -1), torch.cat([q, rest[1]], -1)


def sparse_tvd(s_logits: torch.Tensor, targets: Any, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`tvd` between the bucket distributions (:func:`buckets`) of a teacher cache: the k cached tokens and
    one bucket for the rest, mean over counted positions. (Written out rather than through ``buckets``: the sum over
    the top k, then the rest, is the order the strategy has always summed in.)"""
    s, _, mask = shift(s_logits, labels)
    q = torch.softmax(s.float() / temperature, dim=-1)
    ids = targets.topk_ids[:, :-1].long()
    p_k = torch.exp(targets.topk_logits[:, :-1].float() / temperature - targets.lse[:, :-1].float()[..., None])
    q_k = q.gather(-1, ids)
    rest = ((1 - p_k.sum(-1)).clamp(min=0) - (1 - q_k.sum(-1)).clamp(min=0)).abs()
    return masked_mean(0.5 * ((p_k - q_k).abs().sum(-1) + rest), mask)


# ----------------------------------------------------------------------------------- what the KL strategies call


def kd_terms(
    s_logits: torch.Tensor,
    teacher: Any,
    labels: torch.Tensor,
    temperature: float,
    vocab: int | None = None,
    chunk: int | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, hard) = (:func:`forward_kl`, or :func:`reverse_kl` when ``reverse``; ``causal_ce``) in one fused pass
    over the first ``vocab`` tokens, ``chunk`` positions at a time (:mod:`kdcode.strategies.fused`). ``teacher`` is
    the live teacher's output (``.logits``) or a cache's :class:`~kdcode.strategies.sparse.SparseTargets` (then the
    soft term is the divergence over the buckets, and the cache's temperature must be the one asked for)."""
    if not isinstance(teacher, SparseTargets):
        return dense_kd_terms(s_logits, teacher.logits, labels, temperature, vocab, chunk, reverse)
    if not math.isclose(temperature, teacher.temperature, rel_tol=1e-6):
        raise KdcodeError(
            f"the teacher cache holds soft targets at T={teacher.temperature}, the strategy asks for "
            f"T={temperature}; pass --temperature {teacher.temperature} or rebuild the cache"
        )
    return sparse_kd_terms(
        s_logits, teacher.topk_logits, teacher.topk_ids, teacher.lse, labels, temperature, vocab, chunk, reverse
    )
