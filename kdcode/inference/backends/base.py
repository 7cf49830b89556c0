"""What kdcode's decoder needs from a model that does not run in torch: one step (new token ids + its cache in,
float logits + the grown cache out), the config fields decoding reads, and what bench reports (size, params).

:class:`kdcode.inference.forward.Forward` calls :meth:`StepModel.decode_step` in place of a transformers forward,
so greedy, beam search, sampling, token healing and stops are kdcode's own on every backend. A cache here
answers what beam search asks of transformers' caches: ``reorder_cache(rows)``, ``batch_repeat_interleave(n)``,
``get_seq_length()`` and ``crop(length)``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


class StepModel:
    """A model in another runtime, driven step by step. Subclasses set the fields and :meth:`decode_step`."""

    backend: str = "?"
    dtype_name: str = "?"  # what runs, as bench and eval report it (e.g. "q8_0 (GGUF)")
    backend_device = torch.device("cpu")  # where the logits come back (kdcode.device.model_device reads it)
    training = False

    def __init__(self, config: Any, files: list[Path], param_count: int) -> None:
        self.config = config
        self.files = files  # the weight files on disk (their bytes are the model's size)
        self.param_count = param_count

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def memory_bytes(self) -> int:
        """The weights' bytes in memory (the runtimes here map or load their files as they are)."""
        return self.weight_bytes

    def decode_step(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int
    ) -> tuple[torch.Tensor, Any]:
        """Logits (float32, (rows, keep, vocab)) at the last ``keep`` positions of ``input_ids`` (left-padded
        rows; ``mask`` spans the cache and the new tokens, ``pos`` gives the new tokens' positions), and the cache
        grown by them (``cache`` None: a fresh one)."""
        raise NotImplementedError

    # --- the little of nn.Module that perplexity and token accuracy use: a full pass without a cache
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, _cache = self.decode_step(input_ids, mask, pos, None, input_ids.size(1))
        return SimpleNamespace(logits=logits)

    def eval(self) -> StepModel:
        return self

    def train(self, mode: bool = True) -> StepModel:
        if mode:
            raise TypeError(f"a {self.backend} model runs inference only")
        return self


def config_namespace(**fields: Any) -> Any:
    """A stand-in for a transformers config with the fields decoding reads."""
    return SimpleNamespace(**fields)
