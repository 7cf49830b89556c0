"""Decoding: the KV-cache paths give exactly what a naive full-recompute loop gives."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2

from kdcode.inference.decode import Completer

PROMPTS = ["import os\n\ndef main(argv):\n    ", "class A:\n    def __init__(self):\n        self.x = 1\n", "x = "]


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_gpt2(tokenizer, n_layer=2, seed=7)


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def test_greedy_kv_cache_matches_naive_loop(model, tokenizer):
    c = Completer(model, tokenizer, max_new_tokens=6, heal=False)
    for prompt in PROMPTS:
        ids, prefix = c.encode(prompt)
        assert prefix == ""
        res = Completer(model, tokenizer, max_new_tokens=6, heal=False)
        gens = res._greedy_batch([(ids, "")], True, res.greedy([], 1))
        assert gens[0] == naive_greedy(model, ids, 6)


def test_batched_left_padding_matches_one_by_one(model, tokenizer):
    c = Completer(model, tokenizer, max_new_tokens=6)
    one = [c.greedy([p], 1, fixed_length=True).texts[0] for p in PROMPTS]
    batched = c.greedy(PROMPTS, 3, fixed_length=True).texts
    assert batched == one


def test_beam_of_one_is_greedy(model, tokenizer):
    c = Completer(model, tokenizer, max_new_tokens=6)
    assert c.beam(PROMPTS, beams=1).texts == c.greedy(PROMPTS, 1).texts


def test_beam_search_finds_at_least_greedy_logprob(model, tokenizer):
    c = Completer(model, tokenizer, max_new_tokens=4, heal=False)

    def logprob(ids, gen):
        seq = torch.tensor([ids + gen])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0].float(), -1)
        return sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(gen))

    ids, _ = c.encode(PROMPTS[0])
    greedy = c._greedy_batch([(ids, "")], True, c.greedy([], 1))[0]
    best = c._beam_one(ids, "", 4)
    if len(best) == len(greedy):
        assert logprob(ids, best) >= logprob(ids, greedy) - 1e-4


def test_token_healing_constrains_first_token(model, tokenizer):
    c = Completer(model, tokenizer, max_new_tokens=3, heal=True)
    ids, prefix = c.encode("def f():\n")
    assert prefix.endswith("\n") and tokenizer.decode(ids) + prefix == "def f():\n"
    allowed = c.allowed_after(prefix)
    texts = c.token_texts()
    assert allowed.any()
    assert all(texts[i].startswith(prefix) for i in allowed.nonzero().flatten().tolist())
    gen = c._greedy_batch([(ids, prefix)], True, c.greedy([], 1))[0]
    assert texts[gen[0]].startswith(prefix)


def test_completion_stops_at_end_of_line(model, tokenizer):
    c = Completer(model, tokenizer, max_new_tokens=40)
    for text in c.greedy(PROMPTS, 2).texts:
        assert "\n" not in text
