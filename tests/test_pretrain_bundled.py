"""`kdcode pretrain` and the bundled teacher it produced."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from kdcode.artifacts import sha256_file
from kdcode.cli import app
from kdcode.models import bundled_path, load_model

runner = CliRunner(env={"COLUMNS": "120"})
SPECIALS = ["<s>", "</s>", "<pad>", "<|UNKNOWN|>", "<EOL>"]


def test_pretrain_makes_a_loadable_model_and_tokenizer(tmp_path, corpus_dir):
    out = tmp_path / "pre"
    r = runner.invoke(app, ["pretrain", "--data", str(corpus_dir), "--layers", "2", "--hidden", "32", "--heads", "2",
                            "--vocab-size", "400", "--block-size", "32", "--max-steps", "3", "--warmup-steps", "1",
                            "--precision", "fp32", "--out", str(out)])
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
    r = runner.invoke(app, ["pretrain", "--data", str(corpus_dir), "--layers", "1", "--hidden", "32", "--heads", "2",
                            "--block-size", "32", "--max-steps", "1", "--precision", "fp32", "--tokenizer", str(out),
                            "--out", str(again)])
    assert r.exit_code == 0, r.output
    assert AutoTokenizer.from_pretrained(again).get_vocab() == tok.get_vocab()


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
    # The measured figures travel with the weights. (Issue 3's goal, ES >= 40 and clearly above the
    # repeat-previous-line baseline, is not reached yet by this 100-minute CPU teacher: see README.)
    manifest = json.loads((bundled_path() / "kdcode.json").read_text())
    ev = manifest["metrics"]["eval"]
    assert ev["samples"] == 500 and ev["split"] == "test" and ev["decoding"]["beams"] == 1
    assert 0 < ev["es"] <= 100 and ev["perplexity"] > 1 and ev["baseline"]["samples"] == 500
