"""`kdcode pretrain` and the bundled teacher it produced."""

from __future__ import annotations

import json

import pytest
from conftest import run
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcode.models.artifacts import sha256_file
from kdcode.models.load import bundled_path, load_model

SPECIALS = ["<s>", "</s>", "<pad>", "<|UNKNOWN|>", "<EOL>"]


@pytest.mark.slow
def test_pretrain_makes_a_loadable_model_and_tokenizer(tmp_path, corpus_dir):
    out = tmp_path / "pre"
    r = run("pretrain", "--data", str(corpus_dir), "--layers", "2", "--hidden", "32", "--heads", "2",
            "--vocab-size", "400", "--block-size", "32", "--max-steps", "3", "--warmup-steps", "1",
            "--precision", "fp32", "--out", str(out))
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 2 and model.config.n_embd == 32 and model.config.n_positions == 32
    assert len(tok) == model.config.vocab_size <= 400
    for t in SPECIALS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id or t == "<|UNKNOWN|>"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<|UNKNOWN|>")
    text = "def f(x):\n    return x  # done\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: code round-trips exactly
    m = json.loads((out / "kdcode.json").read_text())
    assert m["kind"] == "pretrained" and m["training"]["steps"] == 3 and m["tokenizer"]["trained"] is True
    assert m["training"]["tokens_seen"] == 3 * 16 * 32

    again = tmp_path / "again"
    r = run("pretrain", "--data", str(corpus_dir), "--layers", "1", "--hidden", "32", "--heads", "2",
            "--block-size", "32", "--max-steps", "1", "--precision", "fp32", "--tokenizer", str(out),
            "--out", str(again))
    assert r.exit_code == 0, r.output
    assert AutoTokenizer.from_pretrained(again).get_vocab() == tok.get_vocab()

    # --init continues training the same model: weights move, shape and tokenizer stay, lineage is kept
    more = tmp_path / "more"
    r = run("pretrain", "--data", str(corpus_dir), "--init", str(out), "--block-size", "32",
            "--max-steps", "2", "--warmup-steps", "0", "--precision", "fp32", "--out", str(more))
    assert r.exit_code == 0, r.output
    cont = AutoModelForCausalLM.from_pretrained(more)
    assert cont.config.n_layer == 2 and cont.config.n_embd == 32
    assert AutoTokenizer.from_pretrained(more).get_vocab() == tok.get_vocab()
    wte0, wte1 = model.transformer.wte.weight, cont.transformer.wte.weight
    assert 0 < (wte1 - wte0).abs().max().item() < 0.1  # trained on from the parent, not re-initialised
    m2 = json.loads((more / "kdcode.json").read_text())
    assert m2["init"]["sha256"] == sha256_file(out / "model.safetensors")
    assert m2["init"]["tokens_seen"] == 3 * 16 * 32
    assert m2["init"]["tokens_seen_total"] == 3 * 16 * 32 + 2 * 16 * 32
    assert m2["tokenizer"]["trained"] is False and m2["spec"]["model"]["layers"] == 2

    r = run("pretrain", "--data", str(corpus_dir), "--init", str(out), "--layers", "4",
            "--max-steps", "1", "--out", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "--layers 4 does not match the --init model (2)" in r.output
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def bundled():
    if not (bundled_path() / "model.safetensors").is_file():
        pytest.fail("the bundled teacher is missing from kdcode/bundled/teacher")
    return load_model("bundled")


def test_bundled_teacher_resolves_offline_and_verifies(bundled, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert bundled.verified is True and bundled.n_layer == 12
    manifest = json.loads((bundled_path() / "kdcode.json").read_text())
    assert manifest["weights_sha256"]["model.safetensors"] == sha256_file(bundled_path() / "model.safetensors")
    assert (bundled_path() / "model.safetensors").stat().st_size <= 16 * 2**20
    assert manifest["kind"] == "pretrained" and manifest["data"]["source"] == "stdlib"
    for t in SPECIALS:
        assert t in bundled.tokenizer.get_vocab()


def test_bundled_teacher_quality_is_recorded(bundled):
    # The measured figures travel with the weights. Issue 3's goal is ES >= 40 and clearly above the
    # repeat-previous-line baseline; the two-stage CPU teacher (docs/measurements.md) is above the baseline,
    # not yet at 40.
    manifest = json.loads((bundled_path() / "kdcode.json").read_text())
    ev = manifest["metrics"]["eval"]
    assert ev["samples"] == 500 and ev["split"] == "test" and ev["decoding"]["beams"] == 1
    assert ev["baseline"]["samples"] == 500 and ev["es"] > ev["baseline"]["es"]
    assert 1 < ev["perplexity"] < 40
    # each stage went on from the one before: the lineage names them all, back to stage 1 (12,652,544
    # tokens on the stdlib without tests), and counts every token seen
    init, chain = manifest["init"], []
    while init:
        assert len(init["sha256"]) == 64 and init["steps"] > 0
        chain.append(init["tokens_seen"])
        init = init["parent_init"]
    assert chain[-1] == 12652544 and len(chain) >= 1
    assert manifest["init"]["tokens_seen_total"] == sum(chain) + manifest["training"]["tokens_seen"]
    assert manifest["spec"]["data"]["exclude_tests"] is False


def _pretrain_spec(corpus_dir, out):
    from kdcode.spec_pretrain import PretrainSpec

    return PretrainSpec.model_validate({
        "model": {"layers": 2, "hidden": 32, "heads": 2, "vocab_size": 400},
        "data": {"source": str(corpus_dir)},
        "train": {"max_steps": 6, "batch_size": 4, "block_size": 32, "precision": "fp32", "warmup_steps": 1,
                  "eval_every": 2, "eval_batches": 2},
        "out": str(out),
    })


@pytest.mark.slow
def test_sigtermed_pretrain_resumes_to_the_same_weights(tmp_path, corpus_dir, monkeypatch):
    import os
    import signal

    import kdcode.train.pretrain as pretrain
    from kdcode.train.loop import Interrupted

    whole, _ = pretrain.run_pretrain(_pretrain_spec(corpus_dir, tmp_path / "whole"))
    spec = _pretrain_spec(corpus_dir, tmp_path / "cut")
    real = pretrain.train_loop

    def interrupted(*args, **kwargs):
        kwargs["on_step"] = lambda r: os.kill(os.getpid(), signal.SIGTERM) if r["step"] == 3 else None
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_loop", interrupted)
    with pytest.raises(Interrupted, match="SIGTERM at step 3"):
        pretrain.run_pretrain(spec)
    ckpt = tmp_path / "cut.ckpt"
    assert (ckpt / "state.json").is_file() and (ckpt / "tokenizer" / "tokenizer.json").is_file()
    assert len((ckpt / "train_log.jsonl").read_text().splitlines()) == 3  # the live log
    monkeypatch.setattr(pretrain, "train_loop", real)
    with pytest.raises(Exception, match="add --resume"):
        pretrain.run_pretrain(spec)
    cut, manifest = pretrain.run_pretrain(spec, resume=True)
    assert manifest["training"]["steps"] == 6 and not ckpt.exists()
    assert sha256_file(cut / "model.safetensors") == sha256_file(whole / "model.safetensors")
    assert AutoTokenizer.from_pretrained(cut).get_vocab() == AutoTokenizer.from_pretrained(whole).get_vocab()
    tr = manifest["training"]
    assert tr["eval_time_s"] > 0 and tr["train_time_s"] <= tr["wall_time_s"]
    assert tr["tokens_seen"] / tr["tokens_per_s"] == pytest.approx(tr["train_time_s"], abs=0.011)  # 2-decimal rounding
    from kdcode.train.heap import _mallopt

    assert tr["heap"] == ("kept" if _mallopt() is not None else "system")  # freed memory stayed in the heap
