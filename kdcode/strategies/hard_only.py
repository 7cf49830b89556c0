"""No teacher: plain causal-LM training, L = CE(s, y).

The control every KD result must beat, and the loop `kdcode pretrain` trains teachers with.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcode.strategies.base import Strategy
from kdcode.strategies.losses import causal_ce


class HardOnly(Strategy):
    summary = "no teacher: plain causal-LM cross-entropy (the control for every KD result)"
    needs_teacher = False

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        hard = causal_ce(self.logits(student), labels)
        return {"loss": hard, "hard": hard}
