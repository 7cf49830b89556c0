"""Student inits that copy a subset of the teacher's blocks (plus embeddings, final norm, LM head)."""

from __future__ import annotations

import math

from kdcode.inits.base import Init


class Alternate(Init):
    """Every (n/k)-th teacher block from the first: 12->6 gives [0, 2, 4, 6, 8, 10]."""

    name = "alternate"
    summary = "teacher blocks 0, n/k, 2n/k, ... (every other block for a half-depth student)"

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        return [math.floor(i * n_teacher / layers) for i in range(layers)]


class Spread(Init):
    """Evenly spaced blocks keeping the first and the last: 12->6 gives [0, 2, 4, 7, 9, 11] (DistilGPT2)."""

    name = "spread"
    summary = "evenly spaced teacher blocks, always keeping the first and last (DistilGPT2's choice)"

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        if layers == 1:
            return [0]
        return [math.floor(i * (n_teacher - 1) / (layers - 1) + 0.5) for i in range(layers)]
