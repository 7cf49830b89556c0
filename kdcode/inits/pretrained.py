"""Start the student from another checkpoint (the study's best variant: a student pre-trained on code).

The checkpoint (HF id or folder) must have the requested depth and the teacher's vocabulary; width
may differ from the teacher's for strategies that support it. Nothing is copied from the teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcode.errors import KdcodeError
from kdcode.inits.base import Init, InitParams
from kdcode.models.artifacts import check_trainable
from kdcode.models.load import check_same_vocab, load_model


class PretrainedParams(InitParams):
    path: str = Field(description="HF id or local folder of the starting checkpoint")
    copy_embeddings: bool = Field(False, description="ignored: the checkpoint brings its own embeddings")
    allow_pickle: bool = False


class Pretrained(Init):
    summary = "start from another checkpoint (e.g. a student pre-trained on code); shape must fit"
    Params = PretrainedParams
    params: PretrainedParams
    allows_width_change = True

    def build(
        self,
        teacher: torch.nn.Module,
        layers: int,
        hidden_size: int | None = None,
        heads: int | None = None,
        tokenizer: Any = None,
    ) -> tuple[torch.nn.Module, list[int | None]]:
        start = load_model(self.params.path, allow_pickle=self.params.allow_pickle)
        check_trainable(start.manifest, f"init 'pretrained' checkpoint {self.params.path}")
        cfg = start.model.config
        wanted = {
            "layers": (layers, cfg.num_hidden_layers),
            "hidden size": (hidden_size, cfg.hidden_size),
            "heads": (heads, cfg.num_attention_heads),
        }
        for what, (want, have) in wanted.items():
            if want is not None and want != have:
                raise KdcodeError(
                    f"init 'pretrained' checkpoint {self.params.path} has {what} {have}, the student asks for {want}; "
                    f"set --{what.replace(' ', '-')} {have} or pick another checkpoint"
                )
        if tokenizer is not None:
            check_same_vocab(tokenizer, start.tokenizer, f"checkpoint {self.params.path}")
        elif cfg.vocab_size != teacher.config.vocab_size:
            raise KdcodeError(
                f"checkpoint {self.params.path} has vocab {cfg.vocab_size}, the teacher {teacher.config.vocab_size}"
            )
        self.origin = start.describe()  # the checkpoint it starts from (its hub id and commit, or path and sha256)
        return start.model.float().train(), [None] * cfg.num_hidden_layers
