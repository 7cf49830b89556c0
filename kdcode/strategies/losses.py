"""Loss terms the strategies share, other than the divergences between the two models' distributions
(:mod:`kdcode.strategies.divergences`): the hard loss, the hidden-state cosine, and the reduction they all use.

All losses work on causal-LM outputs: position t predicts token t+1, and labels equal to -100 are
ignored. Each term is a mean over the predicted (unmasked) positions: :func:`masked_mean`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (0 when none is): every strategy's reduction."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def within(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """The first ``vocab`` columns of ``logits`` (a view): the tokenizer's tokens, without LM-head padding."""
    return logits if vocab is None or logits.size(-1) == vocab else logits[..., :vocab]


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align predictions with next tokens: (logits[:, :-1], labels[:, 1:], mask of counted positions)."""
    logits = logits[:, :-1]
    target = labels[:, 1:]
    return logits, target, target != IGNORE


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard loss: cross-entropy of the next token, mean over counted positions."""
    logits, target, _ = shift(logits, labels)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=IGNORE)


def cosine_hidden(h_s: torch.Tensor, h_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_s, h_t) between last hidden states, mean over counted positions (DistilBERT)."""
    if h_s.size(-1) != h_t.size(-1):
        raise ValueError(f"the cosine loss needs equal widths, got student {h_s.size(-1)} and teacher {h_t.size(-1)}")
    _, _, mask = shift(h_s, labels)
    cos = F.cosine_similarity(h_s[:, :-1].float(), h_t[:, :-1].float(), dim=-1)
    return masked_mean(1 - cos, mask)
