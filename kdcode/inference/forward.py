"""The model's side of decoding: one forward step over new tokens with a KV cache, and the batch plumbing
around it (left padding, growing masks, keeping beam rows). Speculative decoding scores a draft's k tokens
through the same step (``keep=k``) and cuts the cache back. A model of another backend (ONNX Runtime,
llama.cpp, torch with a static cache: :mod:`kdcode.inference.backends`) brings its own step, called the same way.

:class:`PromptCache` keeps a model's cache from one call to the next (a server's requests), so that a prompt that
shares its start with the previous one is prefilled from where they differ."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdcode.inference.vocab import VocabIndex


def _forward_kwargs(model: Any) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True)
class Forward:
    """One forward pass over new tokens with a KV cache, spelled as the model's ``forward`` wants it. Logits past
    the tokenizer's ``tokens`` (LM-head padding, e.g. Qwen2.5's) are -inf: no decoding picks a token that is none."""

    model: Any
    device: torch.device
    cache_kw: str
    takes_keep: bool
    step: Any = None  # a backend's own step (kdcode.inference.backends.base.StepModel.decode_step)
    tokens: int | None = None

    @classmethod
    def of(cls, model: Any, index: VocabIndex | None = None) -> Forward:
        vocab = getattr(model.config, "vocab_size", None)
        if index is not None and vocab is not None and vocab != index.vocab_size:
            raise ValueError(f"the vocabulary index is {index.vocab_size} tokens wide but the model's is {vocab}")
        n = len(index.tokenizer) if index is not None else None
        padded = n if n is not None and vocab is not None and n < vocab else None
        step = getattr(model, "decode_step", None)
        if step is not None:  # ONNX Runtime, llama.cpp, torch with a static cache: same call, their own step
            return cls(model, model.backend_device, "", True, step, padded)
        return cls(model.eval(), next(model.parameters()).device, *_forward_kwargs(model), tokens=padded)

    def __call__(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int = 1
    ) -> tuple[torch.Tensor, Any]:
        """Logits (float) at the last ``keep`` positions, (rows, keep, vocab), and the grown cache."""
        if self.step is not None:
            return self.step(input_ids, mask, pos, cache, keep)
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": pos, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if self.takes_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids, **kwargs)
        logits = out.logits[:, -keep:].float()
        if self.tokens is not None:
            logits[..., self.tokens :] = float("-inf")
        return logits, _out_cache(out)

    def last(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """Logits (float) at the last position, (rows, vocab), and the grown cache."""
        logits, cache = self(input_ids, mask, pos, cache)
        return logits[:, -1], cache


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids left-padded to one width, and their attention mask."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids))
            mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _grow(mask: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The attention mask one position longer (all ones for ``rows`` rows: beams have no padding)."""
    if rows is not None:
        return torch.ones((rows, mask.size(1) + 1), dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, torch.ones((mask.size(0), 1), dtype=mask.dtype, device=mask.device)], dim=1)


class PromptCache:
    """The KV cache a model kept from its last call (batch 1, torch's ``DynamicCache``) and the tokens it holds, so that
    the next call feeds only what follows their longest common prefix (llama.cpp's ``cache_prompt``): an editor's
    next request differs from its last one near the cursor. Only a cache that can be cut back exactly is kept (not
    sliding-window or linear-attention layers, nor another backend's); the others start cold every call."""

    def __init__(self) -> None:
        self.ids: tuple[int, ...] = ()
        self.cache: Any = None
        self.reused = 0  # prompt tokens the last call took from the cache

    def take(self, ids: Sequence[int], upto: int) -> tuple[Any, int]:
        """The kept cache cut back to the longest common prefix of its tokens and ``ids[:upto]``, and that prefix's
        length; (None, 0) when they share nothing. The cache is handed over: nothing is kept until :meth:`keep`, so
        a call that fails half-way leaves no half-grown cache behind. ``upto`` is at most ``len(ids) - 1``: the
        prompt's last token is fed again, for its logits."""
        cache, held = self.cache, self.ids
        self.clear()
        limit = min(len(held), upto, len(ids))
        n = next((i for i in range(limit) if held[i] != ids[i]), limit)
        if cache is None or n == 0:
            return None, 0
        if cache.get_seq_length() > n:
            cache.crop(n - cache.get_seq_length())  # transformers 5: a negative count of tokens to remove
        self.reused = n
        return cache, n

    def keep(self, cache: Any, ids: Sequence[int]) -> None:
        """Keep ``cache`` for the next call; ``ids``: the tokens fed so far (the cache holds their first ones)."""
        if cache is None or not getattr(cache, "is_croppable", False) or any(getattr(cache, "is_sliding", [True])):
            return
        self.cache, self.ids = cache, tuple(ids[: cache.get_seq_length()])

    def clear(self) -> None:
        self.cache, self.ids, self.reused = None, (), 0


def _select_rows(cache: Any, src: torch.Tensor, first: bool) -> None:
    """Keep the cache rows the surviving beams come from (the first step repeats the prompt's one row)."""
    if cache is not None:
        cache.reorder_cache(src) if not first else cache.batch_repeat_interleave(len(src))
