"""Random init: a fresh student of the teacher's architecture with fewer blocks; nothing copied unless asked."""

from __future__ import annotations

from pydantic import Field

from kdcode.inits.base import InitParams, LayerCopyInit


class RandomParams(InitParams):
    copy_embeddings: bool = Field(False, description="copy token/position embeddings, final norm and LM head")


class RandomInit(LayerCopyInit):
    summary = "fresh random weights (optionally the teacher's embeddings); no teacher block copied"
    Params = RandomParams
    allows_width_change = True

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        return [None] * layers
