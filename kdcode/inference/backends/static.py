"""A leaner torch decode path: a static KV cache (allocated once per prompt batch at the model's full context,
written in place) and, with ``compile``, the one-token decode step through ``torch.compile``.

Every decode step then has the same shapes (rows x 1 new token, a cache and a mask of the full context), so the
compiled graph is built once per batch size and reused; the prompt runs eagerly (its length varies), and so do
beam search's steps (its rows are re-made). One cache per batch size is kept and reset for each prompt: a model
holds one live cache per batch size at a time. The mask
handed to the model spans the whole static cache: the positions not written yet are masked out, which is what a
growing cache leaves out. Outputs equal the growing cache's (tests/test_runtimes.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StaticCache

from kdcode.compression.int8 import memory_bytes
from kdcode.inference.backends.base import StepModel
from kdcode.inference.forward import _forward_kwargs
from kdcode.models.load import context_length


class StaticRows:
    """transformers' ``StaticCache`` with the row operations beam search uses. A cache whose rows were repeated
    (beam search's first step) has new tensors: it is decoded eagerly from then on (``reshaped``)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.reshaped = False

    def get_seq_length(self) -> int:
        return int(self.cache.get_seq_length())

    def _layers(self) -> list[Any]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def reorder_cache(self, rows: torch.Tensor) -> None:
        for layer in self._layers():
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                picked = tensor.index_select(0, rows.to(tensor.device))
                if picked.shape == tensor.shape:
                    tensor.copy_(picked)
                else:
                    setattr(layer, name, picked)
            layer.batch_size = len(rows)
        self.reshaped = self.reshaped or any(layer.batch_size != layer.keys.size(0) for layer in self._layers())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reshaped = True
        for layer in self._layers():
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)
            layer.batch_size = layer.keys.size(0)

    def crop(self, length: int) -> None:
        self.cache.crop(length)


class StaticTorch(StepModel):
    """A transformers model decoding with a static cache, its decode step compiled when asked."""

    backend = "torch"

    def __init__(self, model: Any, compile_step: bool, param_count: int, files: list[Any], dtype: str) -> None:
        super().__init__(model.config, files, param_count)
        self.model = model.eval()
        self.max_len = int(context_length(model.config, 1024))
        self.backend_device = next(model.parameters()).device
        self.dtype_name = dtype
        self.compiled = torch.compile(model, dynamic=False) if compile_step else None
        # One static cache per batch size, reset for each prompt: a compiled step is specialised to its tensors'
        # addresses, so a fresh cache per prompt would recompile it every time.
        self.caches: dict[int, StaticRows] = {}

    @property
    def memory_bytes(self) -> int:
        return memory_bytes(self.model)

    def decode_step(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int
    ) -> tuple[torch.Tensor, Any]:
        prompt = cache is None
        if prompt:
            rows = input_ids.size(0)
            cache = self.caches.get(rows)
            if cache is None or cache.reshaped:
                cache = StaticRows(StaticCache(config=self.model.config, max_cache_len=self.max_len))
                self.caches[rows] = cache
            else:
                cache.cache.reset()
        full = torch.zeros((mask.size(0), self.max_len), dtype=mask.dtype, device=mask.device)
        full[:, : mask.size(1)] = mask
        run = self.model if prompt or cache.reshaped or self.compiled is None else self.compiled
        out = run(input_ids, attention_mask=full, position_ids=pos, use_cache=True, logits_to_keep=keep,
                  **{_cache_kw(self.model): cache.cache})
        return out.logits[:, -keep:].float(), cache


def _cache_kw(model: Any) -> str:
    return _forward_kwargs(model)[0]
