"""Drafting by prompt lookup: speculative decoding with no draft model (Saxena's prompt lookup decoding, Hugging
Face's ``prompt_lookup_num_tokens``, llama.cpp's n-gram speculation). Code repeats itself: the tokens that followed
the last time the context's final n-gram appeared are a cheap guess at what follows it now.

At each target pass the proposal is the up-to-``k`` tokens that followed the **most recent earlier occurrence** of
the context's final n-gram (the context: the prompt as the model sees it and every token generated so far), trying
``n = max_n`` first, then ``max_n - 1``, down to 1; no occurrence of any of them: no proposal, and the pass is a
plain single-token target step. The target verifies a proposal as it verifies a draft model's
(:mod:`kdcode.inference.speculative`): a deterministic proposal is a one-hot ``q``, so with sampling a proposed token
``x`` is kept with probability ``p(x)`` and a rejected one replaced by a sample of ``norm(max(0, p - q))``.

``"lookup"`` is the reserved word for it wherever a draft model is named (``--draft lookup``,
``load_engine(draft="lookup")``); a folder of that name is ``./lookup`` (or a :class:`pathlib.Path`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kdcode.errors import KdcodeError

LOOKUP = "lookup"  # the reserved draft name


@dataclass(frozen=True)
class PromptLookup:
    """The draft that is no model: proposals copied from the context (n-grams of at most ``max_n`` tokens matched)."""

    max_n: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.max_n, int) or self.max_n < 1:
            raise KdcodeError(f"prompt lookup matches n-grams of at least 1 token: max_n {self.max_n!r}")

    @property
    def name(self) -> str:
        return LOOKUP


def as_lookup(draft: Any) -> PromptLookup | None:
    """The prompt-lookup draft ``draft`` names (a :class:`PromptLookup`, or the string ``"lookup"``), else None (a
    draft model: a folder, a hub id, ``./lookup``, a ``Path``)."""
    if isinstance(draft, PromptLookup):
        return draft
    if isinstance(draft, str) and draft == LOOKUP:
        return PromptLookup()
    return None


class NgramIndex:
    """A context that only grows, and where each of its n-grams (n = 1..``max_n``) last occurred with a token after
    it: a proposal is one dictionary look-up per n, whatever the context's length."""

    def __init__(self, ids: Iterable[int] = (), max_n: int = 3) -> None:
        if max_n < 1:
            raise KdcodeError(f"prompt lookup matches n-grams of at least 1 token: max_n {max_n!r}")
        self.max_n = max_n
        self.ids: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> the end (exclusive) of its most recent occurrence
        self.extend(ids)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens`` to the context."""
        ids, ends = self.ids, self._ends
        for tok in tokens:
            end = len(ids)  # the n-grams ending here now have a token after them: they are earlier occurrences
            for n in range(1, min(self.max_n, end) + 1):
                ends[tuple(ids[end - n : end])] = end
            ids.append(int(tok))

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the context's final n-gram (the
        longest n that occurs earlier); [] when none does."""
        ids = self.ids
        if k < 1:
            return []
        for n in range(min(self.max_n, len(ids) - 1), 0, -1):
            end = self._ends.get(tuple(ids[-n:]))
            if end is not None:
                return ids[end : end + k]
        return []


def lookup_proposal(context: Sequence[int], k: int, *, max_n: int = 3) -> list[int]:
    """The proposal prompt lookup makes after ``context`` (see :class:`NgramIndex`), computed afresh."""
    return NgramIndex(context, max_n).propose(k)
