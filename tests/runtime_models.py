"""Models and prompts shared by the runtime tests (exports, backends, the static cache).

``two_layer_teacher``: the bundled teacher cut to its first two blocks, a tiny model whose trained weights give
decisive next-token choices (random weights give near-ties everywhere, which any change of arithmetic flips).
``tiny_llama``: a random Llama (GQA, tied head) whose larger init spreads its logits, for the Llama layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdcode.data.corpus import load_corpus
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, VocabIndex, beam_search, greedy
from kdcode.inference.loader import load_for_inference
from kdcode.models.artifacts import save_model
from kdcode.models.load import load_model
from kdcode.spec import DataSpec

OPTS = DecodeOptions(max_new_tokens=16)


def two_layer_teacher(out: Path) -> Path:
    lm = load_model("bundled")
    model = lm.model
    model.transformer.h = model.transformer.h[:2]
    model.config.n_layer = 2
    return save_model(out, model, lm.tokenizer, {"kind": "student"})


def tiny_llama(out: Path, tokenizer: Any) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_model(out, LlamaForCausalLM(config).eval(), tokenizer, {"kind": "student"})


def held_out_prompts(corpus_dir: Path, n: int = 100, seed: int = 0) -> list[str]:
    """``n`` line-completion prompts cut from the test split of the test corpus."""
    docs = load_corpus(DataSpec(source=str(corpus_dir))).splits["test"]
    return [s.input for s in build_line_samples(docs, n, seed)]


def completions(name: str, prompts: list[str], batch_size: int = 8, beams: int = 1, **runtime: Any) -> Any:
    """Greedy (or beam) completions of ``prompts`` by ``name`` in the backend ``runtime`` names, on one thread."""
    lm = load_for_inference(name, "cpu", "auto", 1, runtime=runtime or None)
    index = VocabIndex.for_model(lm.model, lm.tokenizer)
    if beams > 1:
        return beam_search(lm.model, index, prompts, OPTS, beams)
    return greedy(lm.model, index, prompts, OPTS, batch_size)


def differences(ref: Any, other: Any) -> list[tuple[str, str]]:
    return [(a, b) for a, b, x, y in zip(ref.texts, other.texts, ref.token_ids, other.token_ids) if x != y]
