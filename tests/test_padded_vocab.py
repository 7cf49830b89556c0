"""Padded vocabularies (issue 18.4): teacher and student of one tokenizer whose LM heads are padded to different
sizes (Qwen2.5 ships 151,936 and 152,064 rows for 151,665 tokens) distil over the tokenizer's tokens; the padding
is in no softmax, no teacher cache and no decoded token; a real tokenizer mismatch is one clear line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run
from transformers import AutoModelForCausalLM, Qwen2Config

from kdcode.inference.decode import DecodeOptions, greedy
from kdcode.inference.vocab import VocabIndex
from kdcode.plugins import make_strategy
from kdcode.strategies.divergences import forward_kl
from kdcode.strategies.losses import causal_ce

TEACHER_PAD, STUDENT_PAD = 8, 24  # extra LM-head rows beyond the tokenizer's tokens


def qwen2(tokenizer, vocab: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tokenizer):
    """A 4-layer teacher padded by 8 rows, a 2-layer starting checkpoint padded by 24, one tokenizer."""
    d = tmp_path_factory.mktemp("padded")
    v = len(tokenizer)
    teacher = save(qwen2(tokenizer, v + TEACHER_PAD, 4, 0), tokenizer, d / "teacher")
    start = qwen2(tokenizer, v + STUDENT_PAD, 2, 1)
    with torch.no_grad():  # padding rows that would win every softmax (and every argmax) they were part of
        start.lm_head.weight[v:] = 5 * start.lm_head.weight[:v].abs().max()
    return SimpleNamespace(teacher=teacher, start=save(start, tokenizer, d / "start"), v=v)


def test_strategy_losses_read_the_tokenizer_columns_only(tokenizer):
    v = len(tokenizer)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 9, v + STUDENT_PAD, generator=g)
    t = torch.randn(2, 9, v + TEACHER_PAD, generator=g)
    labels = torch.randint(0, v, (2, 9), generator=g)
    for name in ("pretraining", "intermediate", "jsd", "in-training", "hard-only"):
        strategy = make_strategy(name, {"alpha_hid": 0.0} if name == "intermediate" else {})
        strategy.use_logits(v)
        terms = strategy.loss(SimpleNamespace(logits=s), SimpleNamespace(logits=t), labels)
        assert torch.isfinite(terms["loss"])
        if name == "pretraining":
            want = forward_kl(s[..., :v], t[..., :v], labels, 2.0)
            assert terms["soft"].item() == pytest.approx(want.item(), abs=1e-5)
            assert terms["hard"].item() == pytest.approx(causal_ce(s[..., :v], labels).item(), abs=1e-5)


@pytest.mark.slow
def test_padded_teacher_and_student_of_other_size_distil_live_and_cached(tmp_path, padded, corpus_dir):
    fast = ["--data", corpus_dir, "--max-steps", 2, "--batch-size", 2, "--block-size", 32, "--precision", "fp32"]
    spec = tmp_path / "run.yaml"
    spec.write_text(f"student:\n  layers: 2\n  init: {{name: pretrained, params: {{path: {padded.start}}}}}\n")
    r = run("distil", "--spec", spec, "--teacher", padded.teacher, "--out", tmp_path / "live", *fast)
    assert r.exit_code == 0, r.output
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "live")
    assert student.config.vocab_size == padded.v + STUDENT_PAD  # the student keeps its own head
    # the cache holds soft targets over the tokenizer's tokens only
    r = run("cache-teacher", "--teacher", padded.teacher, "--data", corpus_dir, "--block-size", 32, "--top-k", 8,
            "--out", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    from kdcode.train.teacher_cache import load_cache

    cache = load_cache(tmp_path / "cache")
    assert int(cache.topk_ids.max()) < padded.v
    teacher = AutoModelForCausalLM.from_pretrained(padded.teacher)
    with torch.no_grad():
        logits = teacher(cache.input_ids[:1]).logits[0]
    assert torch.allclose(cache.lse[0], torch.logsumexp(logits[:, : padded.v] / 1.0, -1), atol=1e-4)
    r = run("distil", "--spec", spec, "--teacher", padded.teacher, "--teacher-cache", tmp_path / "cache",
            "--out", tmp_path / "cached", *fast)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "cached" / "kdcode.json").read_text())
    assert manifest["teacher_cache"]["top_k"] == 8


def test_tvd_and_jsd_leave_the_padding_out():
    from kdcode.plugins import make_strategy

    torch.manual_seed(0)
    labels = torch.randint(0, 10, (2, 6))
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    pad_s = torch.cat([s, torch.full((2, 6, 6), 9.0)], -1)  # padding rows that would dominate any softmax
    pad_t = torch.cat([t, torch.full((2, 6, 3), 9.0)], -1)
    for name in ("tvd", "jsd"):
        strategy = make_strategy(name, {})
        strategy.use_logits(10)
        want = strategy.loss(SimpleNamespace(logits=s), SimpleNamespace(logits=t), labels)
        got = strategy.loss(SimpleNamespace(logits=pad_s), SimpleNamespace(logits=pad_t), labels)
        assert torch.allclose(got["loss"], want["loss"]), name


def test_decoding_never_picks_a_padding_row(padded, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(padded.start)
    x = torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        assert int(model(x).logits[0, -1].argmax()) >= padded.v  # the padding would win
    gen = greedy(model, VocabIndex.for_model(model, tokenizer), ["def f(x):\n    return "],
                 DecodeOptions(max_new_tokens=6, fixed_length=True, heal=False))
    assert len(gen.token_ids[0]) == 6 and max(gen.token_ids[0]) < padded.v


def test_a_model_narrower_than_its_tokenizer_is_one_clear_line(tmp_path, tokenizer, corpus_dir):
    narrow = save(qwen2(tokenizer, len(tokenizer) - 10, 2, 0), tokenizer, tmp_path / "narrow")
    r = run("distil", "--teacher", narrow, "--data", corpus_dir, "--layers", 1, "--max-steps", 1,
            "--out", tmp_path / "s")
    assert r.exit_code == 2, r.output
    assert f"scores {len(tokenizer) - 10} tokens but the tokenizer has {len(tokenizer)}" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
