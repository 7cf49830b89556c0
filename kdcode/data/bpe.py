"""Byte-level BPE tokenizers with CodeGPT-small-py's special tokens, trained on a corpus."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK, EOL = "<s>", "</s>", "<pad>", "<|UNKNOWN|>", "<EOL>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, EOL]


def wrap(tokenizer_object: Any) -> Any:
    """A transformers fast tokenizer around a ``tokenizers.Tokenizer``, special tokens named as CodeGPT's."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tok.add_special_tokens({"additional_special_tokens": [EOL]})
    tok.model_max_length = 1_000_000_000
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """Train a GPT-2-style byte-level BPE (no prefix space, so code round-trips exactly)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)
