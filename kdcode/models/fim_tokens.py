"""Fill-in-the-middle token formats (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle") of the model families, their detection in a tokenizer, and the order of an infilling prompt.
Inference, export and the training transform (:mod:`kdcode.data.fim`) all take them from here.

Formats (the exact text each builds; ``{prefix}`` is the code before the hole, ``{suffix}`` the code after it):

- ``starcoder``  ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`` (StarCoder, SantaCoder's successors,
  and what kdcode adds to a tokenizer that has no FIM tokens)
- ``qwen``       ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`` (Qwen2.5-Coder, CodeQwen)
- ``codellama``  ``<PRE> {prefix} <SUF>{suffix} <MID>`` (CodeLlama; its vocabulary spells them ``▁<PRE>``...)
- ``deepseek``   ``<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>`` (DeepSeek-Coder)

That is PSM order; SPM (suffix first) is ``<pre><suf>{suffix}<mid>{prefix}`` followed by the middle, the variant
of the paper's appendix that StarCoder and CodeLlama train. Prompts are assembled from token ids (each part
tokenized on its own, as in training), never by tokenizing the text above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdcode.errors import KdcodeError
from kdcode.spec import FIM_FORMATS

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
