"""Fill-in-the-middle training (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle"): the FIM tokens added to a tokenizer that lacks them, and the transform of training blocks. The token
formats themselves are :mod:`kdcode.models.fim_tokens`.

Training transform (context-level FIM, the paper's section 4.3 for short contexts): every training block of
the token stream is cut at end-of-text tokens into pieces (the part of one document that block holds). Each
piece is rearranged with probability ``rate``: decoded, split at two random characters (``mode: document``)
or around one whole non-blank line (``mode: line``: the line with its indentation is the middle, its line
break starts the suffix), each part tokenized on its own, and put in PSM or SPM order (``spm_rate``). A piece
keeps its length: when its parts take more tokens than it had, the suffix is cut at its end (then the prefix
at its start); when fewer, end-of-text tokens follow the middle. The random draws of block ``i`` come from a
generator seeded by ``(seed, i)`` alone, so a teacher cache and a live teacher see the same blocks.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from kdcode.models.fim_tokens import FORMATS, FimFormat, FimTokens, find_tokens, resolve
from kdcode.spec import FimSpec


def ensure_tokens(tokenizer: Any, model: Any, name: str | None) -> tuple[FimTokens, dict[str, Any]]:
    """The FIM tokens of ``tokenizer`` (format ``name``, or the detected one); a tokenizer without them gets
    ``name``'s (StarCoder's by default) as special tokens, and ``model`` (unless None) new embedding rows for
    them, set to the mean of the existing rows (deterministic: a teacher cache and a live teacher agree).
    Returns the tokens and what was added (for the manifest)."""
    found = resolve(tokenizer, name)
    if found is not None:
        return found, {"added_tokens": {}, "vocab_size": len(tokenizer)}
    fmt = FORMATS[name or "starcoder"]
    before = len(tokenizer)
    replace = "replace_extra_special_tokens"
    key = "extra_special_tokens"
    if replace not in inspect.signature(tokenizer.add_special_tokens).parameters:  # transformers 4
        replace, key = "replace_additional_special_tokens", "additional_special_tokens"
    tokenizer.add_special_tokens({key: [fmt.prefix, fmt.suffix, fmt.middle]}, **{replace: False})
    added = find_tokens(tokenizer, fmt.name)
    assert added is not None
    ids = [added.prefix_id, added.suffix_id, added.middle_id]
    info: dict[str, Any] = {"added_tokens": dict(zip((fmt.prefix, fmt.suffix, fmt.middle), ids)),
                            "vocab_size": [before, len(tokenizer)]}
    if model is None:  # a model built later, from the tokenizer's length
        return added, info
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(rows, len(tokenizer)), mean_resizing=False)
    with torch.no_grad():
        embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
        for emb in {id(e): e for e in embeddings if e is not None}.values():  # tied ones once
            emb.weight[ids] = emb.weight[: min(rows, before)].mean(0)
    info["embedding_rows"] = [rows, model.get_input_embeddings().weight.shape[0]]
    info["init"] = "mean of the existing embedding rows"
    return added, info


# ------------------------------------------------------------------------------------------ text level
def split_points(text: str, rng: random.Random, mode: str, protect: re.Pattern[str] | None = None) -> tuple[int, int]:
    """Two character offsets ``a <= b``: the middle is ``text[a:b]``. ``document``: two uniform points (moved
    to the start of a special token's text they fall inside, which ``protect`` matches); ``line``: around one
    whole non-blank line (its indentation included, its line break left to the suffix). ``line`` on a text
    without a non-blank line gives an empty middle at its end."""
    if mode == "line":
        lines, offset = [], 0
        for line in text.splitlines(keepends=True):
            body = line.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
            if body.strip():
                lines.append((offset, offset + len(body)))
            offset += len(line)
        return rng.choice(lines) if lines else (len(text), len(text))
    a, b = sorted((rng.randrange(len(text) + 1), rng.randrange(len(text) + 1)))
    if protect is not None:
        for m in protect.finditer(text):
            a = m.start() if m.start() < a < m.end() else a
            b = m.start() if m.start() < b < m.end() else b
    return a, b


def render(prefix: str, middle: str, suffix: str, fmt: FimFormat, spm: bool = False) -> str:
    """A rearranged document as text (for reading and tests; training assembles token ids)."""
    if spm:
        return f"{fmt.prefix}{fmt.suffix}{suffix}{fmt.middle}{prefix}{middle}"
    return f"{fmt.prefix}{prefix}{fmt.suffix}{suffix}{fmt.middle}{middle}"


def unrender(text: str, fmt: FimFormat) -> str:
    """The document a :func:`render` text came from: prefix + middle + suffix, whichever the order."""
    head, _, rest = text.partition(fmt.prefix)
    if rest.startswith(fmt.suffix):  # SPM: the suffix, then prefix and middle as one run
        suffix, _, prefix_middle = rest[len(fmt.suffix):].partition(fmt.middle)
        return head + prefix_middle + suffix
    prefix, _, rest = rest.partition(fmt.suffix)
    suffix, _, middle = rest.partition(fmt.middle)
    return head + prefix + middle + suffix


# ------------------------------------------------------------------------------------------ token level
def block_rng(seed: int, index: int) -> random.Random:
    """The generator of block ``index``: a function of (seed, index) alone."""
    digest = hashlib.sha256(f"kdcode-fim:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Transform:
    """The FIM transform of training blocks for one tokenizer (see the module docstring)."""

    def __init__(self, spec: FimSpec, tokens: FimTokens, tokenizer: Any) -> None:
        self.spec, self.tokens, self.tokenizer = spec, tokens, tokenizer
        self.eos = tokenizer.eos_token_id
        specials = sorted(set(tokenizer.all_special_tokens) | {tokens.prefix, tokens.suffix, tokens.middle}, key=len,
                          reverse=True)
        self.protect = re.compile("|".join(map(re.escape, specials))) if specials else None

    def stream(self, stream: Sequence[int], block_size: int) -> list[int]:
        """Every whole block of ``stream`` (the ragged tail dropped), transformed, as one stream again."""
        out: list[int] = []
        for i in range(len(stream) // block_size):
            out += self.block(list(stream[i * block_size : (i + 1) * block_size]), block_rng(self.spec.seed, i))
        return out

    def block(self, ids: list[int], rng: random.Random) -> list[int]:
        """One block: its pieces between end-of-text tokens, each rearranged with probability ``rate``."""
        out: list[int] = []
        piece: list[int] = []
        for tok in ids + [None]:  # type: ignore[list-item]
            if tok is None or tok == self.eos:
                if piece:
                    out += self.piece(piece, rng) if rng.random() < self.spec.rate else piece
                piece = []
                if tok is not None:
                    out.append(tok)
            else:
                piece.append(tok)
        assert len(out) == len(ids)
        return out

    def piece(self, ids: list[int], rng: random.Random) -> list[int]:
        """One piece rearranged, as long as it was (unchanged when it is too short to hold the three tokens)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" in text:  # a block boundary inside a character: its bytes cannot be re-tokenized as they were
            return ids
        a, b = split_points(text, rng, self.spec.mode, self.protect)
        spm = rng.random() < self.spec.spm_rate
        parts = self.tokenizer([text[:a], text[a:b], text[b:]], add_special_tokens=False)["input_ids"]
        prefix, middle, suffix = (list(p) for p in parts)
        excess = len(prefix) + len(middle) + len(suffix) + 3 - len(ids)
        if excess > 0:  # re-tokenized parts are longer: the suffix gives way at its end, then the prefix at its start
            cut = min(excess, len(suffix))
            suffix, excess = suffix[: len(suffix) - cut], excess - cut
            prefix, excess = prefix[excess:], max(0, excess - len(prefix))
            if excess > 0 or not middle:
                return ids
        t = self.tokens
        if spm:
            out = [t.prefix_id, t.suffix_id, *suffix, t.middle_id, *prefix, *middle]
        else:
            out = [t.prefix_id, *prefix, t.suffix_id, *suffix, t.middle_id, *middle]
        return out + [self.eos] * (len(ids) - len(out))


def unpermute(ids: Sequence[int], tokens: FimTokens) -> list[int]:
    """The pieces of a rearranged token sequence in document order again (prefix, middle, suffix), sentinels
    dropped; a sequence without sentinels is returned as it is."""
    ids = list(ids)
    if tokens.prefix_id not in ids or tokens.middle_id not in ids:
        return ids
    p, m = ids.index(tokens.prefix_id), ids.index(tokens.middle_id)
    s = ids.index(tokens.suffix_id)
    if s == p + 1:  # SPM
        return ids[:p] + ids[m + 1 :] + ids[s + 1 : m]
    return ids[:p] + ids[p + 1 : s] + ids[m + 1 :] + ids[s + 1 : m]


def section(spec: FimSpec, tokens: FimTokens, added: dict[str, Any]) -> dict[str, Any]:
    """What a manifest records of FIM training: the settings, the format and its token ids, what was added."""
    return {**spec.model_dump(mode="json"), **tokens.describe(), **added}


def prepare(spec: FimSpec | None, tokenizer: Any, model: Any) -> tuple[Transform | None, dict[str, Any] | None]:
    """The transform a run's training blocks go through and its manifest section; (None, None) when FIM is off.
    Adds the FIM tokens to ``tokenizer`` (and rows to ``model``) when they are missing."""
    if spec is None or spec.rate <= 0:
        return None, None
    tokens, added = ensure_tokens(tokenizer, model, spec.format)
    return Transform(spec, tokens, tokenizer), section(spec, tokens, added)


def cache_key(transform: Transform | None) -> dict[str, Any] | None:
    """What a teacher cache records of the FIM transform its blocks went through (None: none)."""
    return None if transform is None else {**transform.spec.model_dump(mode="json"), "format": transform.tokens.name}


def effective(spec: FimSpec | None, teacher_manifest: dict[str, Any] | None) -> FimSpec | None:
    """The FIM settings a run uses: its own (None when the rate is 0), or, when it gives none, those its teacher
    was trained with (a FIM teacher's students keep infilling), else None (off)."""
    if spec is not None:
        return spec if spec.rate > 0 else None
    section_ = (teacher_manifest or {}).get("fim")
    if not isinstance(section_, dict) or not section_.get("rate"):
        return None
    return FimSpec(**{k: section_[k] for k in FimSpec.model_fields if k in section_})
