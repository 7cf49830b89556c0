"""Infilling prompts: the code before and after a hole as the model's FIM prompt (PSM or SPM order: see
:func:`kdcode.models.fim_tokens.infill_order`), cut to its window; and a client's own FIM prompt read back as the
prefix and suffix it holds (:func:`split_prompt`).

The window is the prompt's share of the model's positions (``context``: its positions minus the new tokens).
The three FIM tokens take 3 of them; of the rest, the suffix gets at most a quarter (more when the prefix
leaves more room), the prefix all the rest. The prefix keeps its last tokens (the code just before the hole),
the suffix its first (the code just after it): what is cut is the code farthest from the hole. Prefix and
suffix are tokenized each on its own, as in FIM training; a long one from a whitespace near the kept end,
with slack tokens to spare, as :func:`kdcode.inference.decode.encode_prompt` does, so that a megabyte of code
around the cursor costs no more than the window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdcode.inference.decode import _SLACK_TOKENS, Prompt, _tail_ids
from kdcode.inference.vocab import VocabIndex
from kdcode.models.fim_tokens import FimTokens

SUFFIX_SHARE = 4  # the suffix gets at least 1/4 of the window when it is that long (llama.cpp's /infill split)
_LAST_WHITESPACE = re.compile(r"\s(?=\S*\Z)")


@dataclass(frozen=True)
class Window:
    """What of the prefix and suffix the prompt holds, in tokens, and whether any of either was left out."""

    prefix_tokens: int
    suffix_tokens: int
    cut_prefix: bool
    cut_suffix: bool

    @property
    def cut(self) -> bool:
        return self.cut_prefix or self.cut_suffix


def tail_ids(index: VocabIndex, text: str, keep: int) -> tuple[list[int], bool]:
    """The last ``keep`` token ids of ``text`` (tokenized as a whole), and whether there were more."""
    ids = _tail_ids(index, text, keep + 1) if keep > 0 else []
    return ids[-keep:] if keep > 0 else [], len(ids) > keep or (keep == 0 and bool(text))


def head_ids(index: VocabIndex, text: str, keep: int) -> tuple[list[int], bool]:
    """The first ``keep`` token ids of ``text`` (tokenized as a whole), and whether there were more; a long text is
    tokenized up to a whitespace near its start, with slack tokens to spare (a cut changes only the last token
    or two before it)."""
    tok = index.tokenizer
    window = 16 * (keep + _SLACK_TOKENS)
    while window < len(text):
        cut = _LAST_WHITESPACE.search(text, 0, window)
        if cut is None or cut.start() == 0:
            break
        ids = tok(text[: cut.start()], add_special_tokens=False)["input_ids"]
        if len(ids) >= keep + _SLACK_TOKENS:
            return ids[:keep], True
        window *= 4
    ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
    return ids[:keep], len(ids) > keep


def encode_infill(
    index: VocabIndex, tokens: FimTokens, prefix: str, suffix: str, context: int, heal: bool = False,
    order: str = "psm",
) -> tuple[Prompt, Window]:
    """``<pre> prefix <suf> suffix <mid>`` (``order`` psm) or ``<pre> <suf> suffix <mid> prefix`` (spm) in token
    ids, at most ``context`` of them (see the module docstring).

    ``heal``: the prefix's last token is left out and the middle must start with its text (token healing, as line
    completion does): a prefix that ends at a line start ends with a bare newline token, which BPEs that merge a
    newline with the next line's indentation rarely put before code."""
    room = context - 3
    if room < 2:
        raise ValueError(f"a context of {context} tokens leaves no room for an infilling prompt")
    pre, cut_prefix = tail_ids(index, prefix, room)
    suf, cut_suffix = head_ids(index, suffix, room)
    suffix_take = min(len(suf), max(room // SUFFIX_SHARE, room - len(pre)))
    prefix_take = min(len(pre), room - suffix_take)
    kept = pre[len(pre) - prefix_take :]
    healed = ""
    if heal and len(kept) > 1 and kept[-1] not in index.special_ids:
        healed, kept = index.decode(kept[-1:]), kept[:-1]
    if order == "spm":
        ids = (tokens.prefix_id, tokens.suffix_id, *suf[:suffix_take], tokens.middle_id, *kept)
    else:
        ids = (tokens.prefix_id, *kept, tokens.suffix_id, *suf[:suffix_take], tokens.middle_id)
    cut_prefix = cut_prefix or prefix_take < len(pre)
    return Prompt(ids, healed), Window(prefix_take, suffix_take, cut_prefix, cut_suffix or suffix_take < len(suf))


def split_prompt(text: str, tokens: FimTokens) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt a client built with the model's own FIM template (Continue, Tabby), or None
    when it holds no such template. Text after the middle token (the start of the middle) joins the prefix;
    text before the prefix token (repository context some clients add) is left out."""
    start = text.find(tokens.prefix)
    if start < 0:
        return None
    rest = text[start + len(tokens.prefix):]
    spm = rest.startswith(tokens.suffix)
    if spm:
        suffix, found, prefix = rest[len(tokens.suffix):].partition(tokens.middle)
    else:
        prefix, found, rest = rest.partition(tokens.suffix)
        suffix, found2, middle = rest.partition(tokens.middle)
        found = found and found2
        prefix += middle
    if not found:
        return None
    if tokens.format.spaced:  # "<PRE> {prefix} <SUF>{suffix} <MID>"
        prefix = prefix.removeprefix(" ").removesuffix(" ") if not spm else prefix
        suffix = suffix.removesuffix(" ")
    return prefix, suffix
