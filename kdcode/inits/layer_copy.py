"""Student inits that copy a subset of the teacher's blocks (plus embeddings, final norm, LM head)."""

from __future__ import annotations

import math

from pydantic import Field

from kdcode.errors import KdcodeError
from kdcode.inits.base import InitParams, LayerCopyInit, evenly_spaced


class Alternate(LayerCopyInit):
    """Every (n/k)-th teacher block from the first: 12->6 gives [0, 2, 4, 6, 8, 10]."""

    summary = "teacher blocks 0, n/k, 2n/k, ... (every other block for a half-depth student)"

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        return [math.floor(i * n_teacher / layers) for i in range(layers)]


class Spread(LayerCopyInit):
    """Evenly spaced blocks keeping the first and the last: 12->6 gives [0, 2, 4, 7, 9, 11] (DistilGPT2)."""

    summary = "evenly spaced teacher blocks, always keeping the first and last (DistilGPT2's choice)"

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        return list(evenly_spaced(n_teacher, layers))


class First(LayerCopyInit):
    """The first k teacher blocks: 12->6 gives [0, 1, 2, 3, 4, 5]."""

    summary = "teacher blocks 0..k-1 (the bottom of the teacher)"

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        return list(range(layers))


class Last(LayerCopyInit):
    """The last k teacher blocks: 12->6 gives [6, 7, 8, 9, 10, 11]."""

    summary = "teacher blocks n-k..n-1 (the top of the teacher)"

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        return list(range(n_teacher - layers, n_teacher))


class LayersParams(InitParams):
    layers: list[int] = Field(description="teacher block for each student block, e.g. [0, 3, 7, 11]")


class Explicit(LayerCopyInit):
    """An explicit teacher->student layer list, validated against the teacher's depth."""

    summary = "an explicit list of teacher blocks (init_params: {layers: [0, 3, 7, 11]})"
    Params = LayersParams
    params: LayersParams

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        chosen = self.params.layers
        if len(chosen) != layers:
            raise KdcodeError(f"init 'layers' lists {len(chosen)} blocks for a {layers}-layer student; make them match")
        bad = [j for j in chosen if not 0 <= j < n_teacher]
        if bad:
            raise KdcodeError(f"init 'layers' names blocks {bad} outside the teacher's 0..{n_teacher - 1}")
        return list(chosen)
