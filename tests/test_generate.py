"""Decoding: the KV-cache paths give exactly what a naive full-recompute loop gives; options and results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_gpt2, run

from kdcode.inference.decode import (
    DecodeOptions,
    Prompt,
    VocabIndex,
    beam_alternatives,
    beam_hypotheses,
    beam_search,
    encode_prompt,
    greedy,
)

PROMPTS = ["import os\n\ndef main(argv):\n    ", "class A:\n    def __init__(self):\n        self.x = 1\n", "x = "]


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_gpt2(tokenizer, n_layer=2, seed=7)


@pytest.fixture(scope="module")
def index(model, tokenizer):
    return VocabIndex.for_model(model, tokenizer)


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def test_greedy_kv_cache_matches_naive_loop(model, index):
    opts = DecodeOptions(max_new_tokens=6, heal=False, fixed_length=True)
    for prompt in PROMPTS:
        encoded = encode_prompt(index, prompt, opts, opts.context_for(128))
        assert encoded.healed == ""
        gen = greedy(model, index, [encoded], opts, 1)
        assert gen.token_ids[0] == naive_greedy(model, list(encoded.ids), 6)
        assert gen.token_counts == [6] and len(gen.prefill_s) == 1 and len(gen.step_s) == 5


def test_batched_left_padding_matches_one_by_one(model, index):
    opts = DecodeOptions(max_new_tokens=6, fixed_length=True)
    one = [greedy(model, index, [p], opts, 1).texts[0] for p in PROMPTS]
    batched = greedy(model, index, PROMPTS, opts, 3).texts
    assert batched == one


def test_beam_of_one_is_greedy(model, index):
    opts = DecodeOptions(max_new_tokens=6)
    assert beam_search(model, index, PROMPTS, opts, beams=1).texts == greedy(model, index, PROMPTS, opts, 1).texts


def test_beam_search_finds_at_least_greedy_logprob(model, index):
    opts = DecodeOptions(max_new_tokens=4, heal=False)

    def logprob(ids, gen):
        seq = torch.tensor([ids + gen])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0].float(), -1)
        return sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(gen))

    encoded = encode_prompt(index, PROMPTS[0], opts, opts.context_for(128))
    ids = list(encoded.ids)
    greedy_ids = greedy(model, index, [encoded], dataclasses.replace(opts, fixed_length=True), 1).token_ids[0]
    best = beam_hypotheses(model, index, encoded, opts, 4)[0]
    assert best.logprob == pytest.approx(logprob(ids, list(best.token_ids)), abs=1e-3)
    if len(best.token_ids) == len(greedy_ids):
        assert logprob(ids, list(best.token_ids)) >= logprob(ids, greedy_ids) - 1e-4


def test_token_healing_constrains_first_token(model, index, tokenizer):
    opts = DecodeOptions(max_new_tokens=3, heal=True, fixed_length=True)
    encoded = encode_prompt(index, "def f():\n", opts, opts.context_for(128))
    assert encoded.healed.endswith("\n") and tokenizer.decode(list(encoded.ids)) + encoded.healed == "def f():\n"
    allowed = index.allowed_after(encoded.healed)
    texts = index.token_texts
    assert allowed.any()
    assert all(texts[i].startswith(encoded.healed) for i in allowed.nonzero().flatten().tolist())
    gen = greedy(model, index, [encoded], opts, 1).token_ids[0]
    assert texts[gen[0]].startswith(encoded.healed)


def test_completion_stops_at_end_of_line(model, index):
    gen = greedy(model, index, PROMPTS, DecodeOptions(max_new_tokens=40), 2)
    for text, stopped, count in zip(gen.texts, gen.stopped, gen.token_counts):
        assert "\n" not in text
        assert stopped or count == 40


def test_options_are_frozen_and_checked():
    opts = DecodeOptions(stop_strings=["(", ")"])  # a list is kept as a tuple
    assert opts.stop_strings == ("(", ")") and hash(opts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.temperature = 1.0  # type: ignore[misc]
    assert DecodeOptions(max_new_tokens=8).context_for(128) == 120
    assert DecodeOptions(max_new_tokens=8, context_tokens=50).context_for(128) == 50
    assert DecodeOptions(max_new_tokens=8, context_tokens=500).context_for(128) == 120
    with pytest.raises(ValueError, match="no room"):
        DecodeOptions(max_new_tokens=128).context_for(128)
    for bad in ({"max_new_tokens": 0}, {"stop_strings": ("",)}, {"temperature": -1.0},
                {"temperature": float("nan")}, {"context_tokens": 0}):
        with pytest.raises(ValueError):
            DecodeOptions(**bad)
    with pytest.raises(TypeError):
        DecodeOptions(stop_strings="\n")  # type: ignore[arg-type]


def test_vocab_index_is_built_once_and_shared(model, index):
    """Calls leave the index's tables in place: a second call reuses the very same masks."""
    opts = DecodeOptions(max_new_tokens=4, heal_space=True)
    greedy(model, index, ["def f():\n    "], opts)
    texts, masks = index.token_texts, dict(index._allowed)
    assert masks and texts is index.token_texts
    greedy(model, index, ["def f():\n    "], opts)
    assert all(index._allowed[k] is v for k, v in masks.items())
    with pytest.raises(ValueError, match="wide"):
        greedy(model, VocabIndex(index.tokenizer, index.vocab_size + 1), PROMPTS, opts)


def test_sampling_is_seeded_and_a_tiny_temperature_is_greedy(model, index):
    opts = DecodeOptions(max_new_tokens=6, temperature=1.5, seed=11, fixed_length=True)
    a, b = greedy(model, index, PROMPTS * 2, opts, 6), greedy(model, index, PROMPTS * 2, opts, 6)
    assert a.token_ids == b.token_ids
    other = greedy(model, index, PROMPTS * 2, dataclasses.replace(opts, seed=12), 6)
    assert other.token_ids != a.token_ids  # 36 tokens at a high temperature: equal only by a fluke
    plain = greedy(model, index, PROMPTS, dataclasses.replace(opts, temperature=0.0), 3).token_ids
    for tiny in (1e-30, 1e-40, 1e-300):  # from 1e-40 on, float32 logits / T overflow: the limit is the argmax
        assert greedy(model, index, PROMPTS, dataclasses.replace(opts, temperature=tiny), 3).token_ids == plain


def test_on_token_sees_every_token_by_prompt_index(model, index):
    seen: dict[int, list[int]] = {}
    opts = DecodeOptions(max_new_tokens=5)
    gen = greedy(model, index, PROMPTS, opts, batch_size=2, on_token=lambda i, t: seen.setdefault(i, []).append(t))
    assert [seen[i] for i in range(len(PROMPTS))] == gen.token_ids


def test_beam_alternatives_are_distinct_and_best_first(model, index):
    opts = DecodeOptions(max_new_tokens=6)
    alts = beam_alternatives(model, index, PROMPTS[2], opts, beams=2, n=3)
    assert 1 <= len(alts.texts) <= 3 and len(set(alts.texts)) == len(alts.texts)
    assert alts.texts[0] == beam_search(model, index, [PROMPTS[2]], opts, beams=3).texts[0]
    hyps = beam_hypotheses(model, index, Prompt(tuple(index.tokenizer("x = ")["input_ids"])), opts, 3)
    finished = [h.finished for h in hyps]
    assert finished == sorted(finished, reverse=True)  # finished ones first
    for group in (True, False):
        scores = [h.logprob for h in hyps if h.finished is group]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(("positions", "new", "asked", "kept"), [
    (1024, 100, None, 924),  # CodeGPT as CodeXGLUE: 1,024 - 100
    (256, 48, None, 208),  # the bundled teacher
    (8192, 48, None, 976),  # SmolLM2: not its whole 8k unless asked
    (8192, 48, 4000, 4000),
    (256, 48, 4000, 208),  # never more than the positions leave
])
def test_the_context_kept_by_default_and_when_asked(positions, new, asked, kept):
    from kdcode.inference.decode import DecodeOptions

    assert DecodeOptions(max_new_tokens=new, context_tokens=asked).context_for(positions) == kept


def test_eval_and_bench_take_context_and_record_it(tmp_path, teacher_dir, corpus_dir):
    import json

    out = tmp_path / "eval.json"
    r = run("eval", str(teacher_dir), "--data", str(corpus_dir), "--samples", "4", "--ppl-blocks", "0",
            "--max-new-tokens", "4", "--context", "40", "--json", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["decoding"]["context_tokens"] == 40
    out = tmp_path / "bench.json"
    r = run("bench", str(teacher_dir), "--data", str(corpus_dir), "--prompts", "2", "--rounds", "1",
            "--new-tokens", "2", "--context", "30", "--json", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["context_tokens"] == 30
