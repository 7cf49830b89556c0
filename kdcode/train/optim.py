"""The optimiser and its learning-rate schedule (nanoGPT's choices)."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(progress: float, step: int, cfg: Any) -> float:
    """Linear warmup over ``warmup_steps``, then cosine (or linear) decay to ``min_lr_ratio * lr`` at progress 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(progress, 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay matrices only; biases and norm gains stay undecayed (GPT-2/nanoGPT practice).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
