"""A tokenizer's tables for decoding, built once per tokenizer and shared by every decoding call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdcode.models.fim_tokens import stop_ids as fim_stops


class VocabIndex:
    """A tokenizer's tables for decoding, built once and shared by every call: special, stop and pad ids,
    every token's text, and the healing masks (cached per healed text). ``vocab_size`` is the model's
    (its logits' width), which may differ from the tokenizer's length."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        eol = tokenizer.convert_tokens_to_ids("<EOL>")
        # the end of a line (py150), of the text, and of a middle: a FIM sentinel or end-of-middle token
        self.stop_ids = frozenset(
            i for i in (eol, tokenizer.eos_token_id) if i is not None and i != tokenizer.unk_token_id
        ) | fim_stops(tokenizer)
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._texts: list[str] | None = None
        self._allowed: dict[str, torch.Tensor] = {}
        self._partial: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any) -> VocabIndex:
        return cls(tokenizer, getattr(model.config, "vocab_size", None))

    @property
    def token_texts(self) -> list[str]:
        """The text of every token id (built on first use: only healing needs it)."""
        if self._texts is None:
            self._texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._texts

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def allowed_after(self, prefix: str) -> torch.Tensor:
        """Vocabulary mask of the (non-special) tokens whose text starts with ``prefix``."""
        if prefix not in self._allowed:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            for i, text in enumerate(self.token_texts[: self.vocab_size]):
                if text.startswith(prefix) and i not in self.special_ids:
                    mask[i] = True
            self._allowed[prefix] = mask
        return self._allowed[prefix]

    def allowed_toward(self, rest: str) -> torch.Tensor:
        """Vocabulary mask of the tokens that start with ``rest`` or produce a first part of it."""
        if rest not in self._partial:
            mask = self.allowed_after(rest).clone()
            for i, text in enumerate(self.token_texts[: mask.numel()]):
                if text and rest.startswith(text) and i not in self.special_ids:
                    mask[i] = True
            self._partial[rest] = mask
        return self._partial[rest]

    def heal_mask(self, gen_ids: Sequence[int], healed: str, partial: bool) -> torch.Tensor | None:
        """Tokens that may come next while ``healed`` is not produced yet (None once it is); ``partial``:
        it may be produced over several tokens."""
        done = self.decode(gen_ids) if gen_ids else ""
        if len(done) >= len(healed):
            return None
        rest = healed[len(done) :]
        return self.allowed_toward(rest) if partial else self.allowed_after(rest)

    def completion_text(self, gen_ids: Sequence[int], healed: str, stops: Sequence[str]) -> str:
        """The completion the generated ids make: the healed text cut off, ended before the first stop."""
        text = self.tokenizer.decode([i for i in gen_ids if i not in self.stop_ids], skip_special_tokens=False)
        text = text[len(healed) :]
        return text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]

    def ended(self, gen_ids: Sequence[int], healed: str, stops: Sequence[str]) -> bool:
        """Whether the generated ids end the completion: a stop token, or a stop string in its text."""
        if gen_ids and gen_ids[-1] in self.stop_ids:
            return True
        text = self.decode(gen_ids)[len(healed) :]
        return any(s in text for s in stops)


# ---------------------------------------------------------------------------------------------- prompts
