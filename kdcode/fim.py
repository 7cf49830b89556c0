"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"):
the FIM token formats of the model families, their detection in a tokenizer, the training transform, and the
split of a client's templated prompt back into prefix and suffix.

Formats (the exact text each builds; ``{prefix}`` is the code before the hole, ``{suffix}`` the code after it):

- ``starcoder``  ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`` (StarCoder, SantaCoder's successors,
  and what kdcode adds to a tokenizer that has no FIM tokens)
- ``qwen``       ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`` (Qwen2.5-Coder, CodeQwen)
- ``codellama``  ``<PRE> {prefix} <SUF>{suffix} <MID>`` (CodeLlama; its vocabulary spells them ``▁<PRE>``...)
- ``deepseek``   ``<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>`` (DeepSeek-Coder)

That is PSM order; SPM (suffix first) is ``<pre><suf>{suffix}<mid>{prefix}`` followed by the middle, the variant
of the paper's appendix that StarCoder and CodeLlama train. Prompts are assembled from token ids (each part
tokenized on its own, as in training), never by tokenizing the text above.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdcode.errors import KdcodeError
from kdcode.spec import FIM_FORMATS, FimSpec

_SENTENCEPIECE_SPACE = "\u2581"  # how SentencePiece vocabularies spell a leading space ("▁<PRE>")


@dataclass(frozen=True)
class FimFormat:
    """One family's FIM token names: prefix, suffix and middle sentinels, and the tokens that end a middle."""

    name: str
    prefix: str
    suffix: str
    middle: str
    stops: tuple[str, ...] = ()
    spaced: bool = False  # CodeLlama's text form puts a space after <PRE> and before <SUF> and <MID>

    def template(self, prefix: str = "{prefix}", suffix: str = "{suffix}") -> str:
        """The PSM prompt as text, e.g. ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>``."""
        if self.spaced:
            return f"{self.prefix} {prefix} {self.suffix}{suffix} {self.middle}"
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


FORMATS: dict[str, FimFormat] = {
    "starcoder": FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
                           ("<fim_pad>", "<file_sep>", "<|endoftext|>")),
    "qwen": FimFormat("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                      ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|endoftext|>")),
    "codellama": FimFormat("codellama", "<PRE>", "<SUF>", "<MID>", ("<EOT>",), spaced=True),
    "deepseek": FimFormat("deepseek", "<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>",
                          "<\uff5cfim\u2581end\uff5c>", ("<\uff5cend\u2581of\u2581sentence\uff5c>",)),
}
assert tuple(FORMATS) == FIM_FORMATS  # spec.py names them without importing this module


@dataclass(frozen=True)
class FimTokens:
    """A format as one tokenizer spells it: the sentinel strings found in its vocabulary and their ids."""

    format: FimFormat
    prefix: str
    suffix: str
    middle: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    stop_ids: frozenset[int]  # the sentinels, the format's end-of-middle tokens, end-of-text

    @property
    def name(self) -> str:
        return self.format.name

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "tokens": {self.prefix: self.prefix_id, self.suffix: self.suffix_id,
                                                self.middle: self.middle_id}}


def _lookup(vocab: Mapping[str, int], token: str) -> tuple[str, int] | None:
    for spelling in (token, _SENTENCEPIECE_SPACE + token):
        if spelling in vocab:
            return spelling, vocab[spelling]
    return None


def find_tokens(tokenizer: Any, name: str) -> FimTokens | None:
    """Format ``name`` as ``tokenizer`` spells it, or None when its vocabulary lacks one of the sentinels."""
    fmt = FORMATS[name]
    vocab = tokenizer.get_vocab()
    found = [_lookup(vocab, t) for t in (fmt.prefix, fmt.suffix, fmt.middle)]
    if any(f is None for f in found):
        return None
    (p, pid), (s, sid), (m, mid) = found  # type: ignore[misc]
    stops = {pid, sid, mid} | {f[1] for t in fmt.stops if (f := _lookup(vocab, t)) is not None}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return FimTokens(fmt, p, s, m, pid, sid, mid, frozenset(stops))


def detect(tokenizer: Any) -> FimTokens | None:
    """The first family (StarCoder, Qwen-Coder, CodeLlama, DeepSeek-Coder) whose three sentinels the tokenizer has."""
    for name in FORMATS:
        if (found := find_tokens(tokenizer, name)) is not None:
            return found
    return None


def stop_ids(tokenizer: Any) -> frozenset[int]:
    """The FIM sentinels and end-of-middle tokens of every family the tokenizer has: no completion goes past one."""
    return frozenset(i for name in FORMATS if (found := find_tokens(tokenizer, name)) for i in found.stop_ids)


def resolve(tokenizer: Any, name: str | None = None) -> FimTokens | None:
    """Format ``name`` (any known one when None) in ``tokenizer``; None when it has no such tokens."""
    if name is None:
        return detect(tokenizer)
    if name not in FORMATS:
        raise KdcodeError(f"unknown FIM format {name!r}; use one of {', '.join(FORMATS)}")
    return find_tokens(tokenizer, name)


def require(tokenizer: Any, name: str | None, what: str) -> FimTokens:
    """Like :func:`resolve`, or one line saying that ``what`` cannot infill."""
    found = resolve(tokenizer, name)
    if found is None:
        wanted = f"{name} FIM tokens ({FORMATS[name].template()})" if name else (
            "FIM tokens (StarCoder, Qwen-Coder, CodeLlama or DeepSeek-Coder)")
        raise KdcodeError(
            f"{what} does not infill: its tokenizer has no {wanted}; give it a model trained with FIM "
            "(kdcode pretrain --init MODEL --fim-rate 0.5 adds them), or --fim-format if it uses another family's"
        )
    return found


def ensure_tokens(tokenizer: Any, model: Any, name: str | None) -> tuple[FimTokens, dict[str, Any]]:
    """The FIM tokens of ``tokenizer`` (format ``name``, or the detected one); a tokenizer without them gets
    ``name``'s (StarCoder's by default) as special tokens, and ``model`` (unless None) new embedding rows for
    them, set to the mean of the existing rows (deterministic: a teacher cache and a live teacher agree).
    Returns the tokens and what was added (for the manifest)."""
    found = resolve(tokenizer, name)
    if found is not None:
        return found, {"added_tokens": {}, "vocab_size": len(tokenizer)}
    import torch

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


def infill_order(requested: str | None, manifest: dict[str, Any] | None) -> str:
    """The order of an infilling prompt: ``psm`` (prefix, suffix, then the middle) or ``spm`` (suffix, then prefix
    and middle as one run) as asked; ``auto``: SPM for a model kdcode trained with SPM pieces at least half the
    time (its manifest's ``fim.spm_rate``), else PSM, the order FIM model cards document. In SPM the prefix ends
    right where the middle starts, as in line completion: the bundled teacher's FIM stage infills at 40.60 ES in SPM
    against 28.1 in PSM on the same 500 holes (docs/measurements.md)."""
    if requested in ("psm", "spm"):
        return requested
    if requested not in (None, "auto"):
        raise KdcodeError(f"unknown FIM order {requested!r}: use psm, spm or auto")
    section_ = (manifest or {}).get("fim")
    return "spm" if isinstance(section_, dict) and float(section_.get("spm_rate") or 0) >= 0.5 else "psm"


def effective(spec: FimSpec | None, teacher_manifest: dict[str, Any] | None) -> FimSpec | None:
    """The FIM settings a run uses: its own (None when the rate is 0), or, when it gives none, those its teacher
    was trained with (a FIM teacher's students keep infilling), else None (off)."""
    if spec is not None:
        return spec if spec.rate > 0 else None
    section_ = (teacher_manifest or {}).get("fim")
    if not isinstance(section_, dict) or not section_.get("rate"):
        return None
    return FimSpec(**{k: section_[k] for k in FimSpec.model_fields if k in section_})
