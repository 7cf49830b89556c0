"""Student folders: save -> plain transformers load -> same logits; integrity checks; atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcode.errors import KdcodeError
from kdcode.models.artifacts import MANIFEST, atomic_dir, save_model, sha256_file, update_metrics, verify
from kdcode.models.load import load_model


@pytest.fixture()
def saved(tmp_path, tokenizer):
    model = make_gpt2(tokenizer, n_layer=2, seed=3)
    out = save_model(tmp_path / "student", model, tokenizer, {"kind": "student", "spec": {"a": 1}})
    return out, model


def test_round_trip_plain_transformers_same_logits(saved, tokenizer):
    out, model = saved
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    x = torch.tensor([tok("def f(x):\n    return x\n")["input_ids"]])
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_folder_layout_and_manifest(saved):
    out, _ = saved
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", MANIFEST, "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["weights_sha256"] == {"model.safetensors": sha256_file(out / "model.safetensors")}
    assert manifest["kind"] == "student" and manifest["spec"] == {"a": 1}
    assert {"torch", "transformers", "kdcode"} <= manifest["libraries"].keys()
    assert verify(out) is True
    assert not list(out.parent.glob(".student.tmp-*"))


def test_edited_weights_are_refused(saved):
    out, _ = saved
    with (out / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(KdcodeError, match="does not match the sha256"):
        verify(out)
    with pytest.raises(KdcodeError, match="--no-verify"):
        load_model(str(out))
    assert load_model(str(out), check=False).verified is False


def test_missing_weights_are_refused(saved):
    out, _ = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(KdcodeError, match="no weight files"):
        load_model(str(out))


def test_newer_manifest_is_refused(saved):
    out, _ = saved
    m = json.loads((out / MANIFEST).read_text())
    m["kdcode_version"] = "99.0.0"
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(KdcodeError, match="newer than this kdcode"):
        verify(out)


def test_plain_hf_folder_is_accepted_unverified(teacher_dir):
    assert verify(teacher_dir) is None
    assert load_model(str(teacher_dir)).verified is None


def test_pickle_only_folder_is_refused(tmp_path, teacher_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((teacher_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(KdcodeError, match="--allow-pickle"):
        load_model(str(d))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    model = make_gpt2(tokenizer, n_layer=1)
    with pytest.raises(KdcodeError, match="--overwrite"):
        save_model(out, model, tokenizer, {})
    assert (out / "keep.txt").exists()
    save_model(out, model, tokenizer, {}, overwrite=True)
    assert not (out / "keep.txt").exists() and verify(out) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_update_metrics_records_atomically(saved):
    out, _ = saved
    update_metrics(Path(out), "eval", {"es": 50.0})
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["metrics"]["eval"] == {"es": 50.0}
    assert "es" in (out / "README.md").read_text()
    assert verify(out) is True
