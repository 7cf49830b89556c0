"""`kdcode export --format gguf` (issue 19.2): what the file holds (llama.cpp's tensor names and types per
--quant, the tokenizer, kdcode's provenance), what lies beside it (the sidecar manifest, the ollama Modelfile),
and what is refused. Running the files is tests/test_llamacpp.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package: pip install 'kdcode[gguf]'")

from runtime_models import tiny_llama  # noqa: E402

from kdcode.errors import KdcodeError  # noqa: E402
from kdcode.export.gguf_arch import _pairs_adjacent, arch_of  # noqa: E402
from kdcode.export.gguf_file import gguf_manifest, read_fields  # noqa: E402
from kdcode.export.gguf_vocab import tokenizer_from_gguf  # noqa: E402
from kdcode.export.run import modelfile_path, run_export, sidecar_path  # noqa: E402
from kdcode.models.artifacts import weights_sha256  # noqa: E402
from kdcode.spec_compress import ExportSpec  # noqa: E402


def _export(src: Path, out: Path, quant: str = "f32", **kw) -> dict:
    return run_export(str(src), ExportSpec(format="gguf", quant=quant), out, **kw)[1]


def test_gguf_holds_the_model_the_tokenizer_and_where_it_came_from(student_src, tmp_path):
    out = tmp_path / "s.gguf"
    manifest = _export(student_src, out)
    fields = read_fields(out)
    assert fields["general.architecture"] == "gpt2" and fields["gpt2.block_count"] == 2
    assert fields["gpt2.context_length"] == 128 and fields["gpt2.embedding_length"] == 32
    tensors = fields["tensors"]
    assert "output.weight" not in tensors  # the tied head: llama.cpp reads token_embd in its place
    assert tensors["blk.0.attn_qkv.weight"] == ("F32", [32, 96])  # (out, in) rows of the Conv1D's transpose
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == 512 and fields["tokenizer.ggml.eos_token_id"] == 1
    inside = gguf_manifest(fields)
    assert inside["source"]["weights_sha256"] == weights_sha256(student_src)
    assert inside["export"] == {"format": "gguf", "quant": "f32", "int8": False, "opset": 18}
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar == manifest and sidecar["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sidecar["source"] == inside["source"] and sidecar["gguf"]["provenance_key"] == "kdcode.manifest"
    text = modelfile_path(out).read_text()
    assert "FROM ./s.gguf" in text and 'TEMPLATE "{{ .Prompt }}"' in text and "PARAMETER num_ctx 128" in text
    assert 'PARAMETER stop """\n"""' in text and 'PARAMETER stop "<EOL>"' in text and 'PARAMETER stop "</s>"' in text
    assert not list(tmp_path.glob(".s.gguf.tmp-*"))


def test_quant_types_per_tensor(student_src, tmp_path):
    sizes = {}
    for quant, kind in (("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        out = tmp_path / f"s.{quant}.gguf"
        manifest = _export(student_src, out, quant)
        tensors = read_fields(out)["tensors"]
        assert tensors["token_embd.weight"][0] == kind and tensors["blk.1.ffn_down.weight"][0] == kind
        assert tensors["blk.1.ffn_down.bias"][0] == "F32" and tensors["blk.0.attn_norm.weight"][0] == "F32"
        assert tensors["position_embd.weight"][0] == "F32"
        assert manifest["gguf"]["quant"] == quant
        sizes[quant] = out.stat().st_size
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_the_tokenizer_read_back_from_llama_cpp_keys_is_the_same(student_src, tokenizer, corpus_dir, tmp_path):
    out = tmp_path / "s.gguf"
    _export(student_src, out)
    back = tokenizer_from_gguf(gguf.GGUFReader(str(out)))
    assert back.get_vocab() == tokenizer.get_vocab()
    assert back.all_special_ids == tokenizer.all_special_ids
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (0, 1, 2)
    for path in sorted(corpus_dir.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == ids
        assert back.decode(ids) == text
    assert back.decode([4, 1]) == tokenizer.decode([4, 1]) == "<EOL></s>"


def test_llama_layout_names_and_rope_pairs(tokenizer, tmp_path):
    src = tiny_llama(tmp_path / "llama", tokenizer)
    out = tmp_path / "llama.gguf"
    _export(src, out)
    fields = read_fields(out)
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 8 and fields["llama.rope.freq_base"] == 10000.0
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm"):
        assert f"blk.1.{name}.weight" in fields["tensors"]
    assert "output.weight" not in fields["tensors"]


def _rope_halves(x: torch.Tensor, pos: int) -> torch.Tensor:
    """transformers' rotation: pairs (i, i + d/2)."""
    d = x.size(-1)
    theta = pos / 10000 ** (torch.arange(d // 2) * 2 / d)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1)


def _rope_adjacent(x: torch.Tensor, pos: int) -> torch.Tensor:
    """llama.cpp's llama rotation: pairs (2i, 2i + 1)."""
    d = x.size(-1)
    theta = pos / 10000 ** (torch.arange(d // 2) * 2 / d)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1).flatten(-2)


def test_reordered_q_k_rows_give_llama_cpp_the_same_attention_scores():
    torch.manual_seed(0)
    heads, d, hidden = 3, 8, 16
    wq, wk = torch.randn(heads * d, hidden), torch.randn(heads * d, hidden)
    x, y = torch.randn(hidden), torch.randn(hidden)
    q, k = (wq @ x).view(heads, d), (wk @ y).view(heads, d)
    q2 = (torch.from_numpy(_pairs_adjacent(wq.numpy(), heads)) @ x).view(heads, d)
    k2 = (torch.from_numpy(_pairs_adjacent(wk.numpy(), heads)) @ y).view(heads, d)
    for pq, pk in ((5, 2), (17, 17), (0, 9)):
        hf = (_rope_halves(q, pq) * _rope_halves(k, pk)).sum(-1)
        cpp = (_rope_adjacent(q2, pq) * _rope_adjacent(k2, pk)).sum(-1)
        assert torch.allclose(hf, cpp, atol=1e-4), (hf, cpp)
    unpermuted = (_rope_adjacent(q, 5) * _rope_adjacent(k, 2)).sum(-1)
    assert not torch.allclose(unpermuted, (_rope_halves(q, 5) * _rope_halves(k, 2)).sum(-1), atol=1e-3)


def test_refusals_are_one_line(student_src, tmp_path, tokenizer):
    out = tmp_path / "s.gguf"
    _export(student_src, out)
    with pytest.raises(KdcodeError, match="exists; choose another --out or pass --overwrite"):
        _export(student_src, out)
    _export(student_src, out, overwrite=True)
    with pytest.raises(KdcodeError, match="lies inside the input MODEL"):
        _export(student_src, student_src / "x.gguf")
    with pytest.raises(KdcodeError, match="name it F.gguf"):
        _export(student_src, tmp_path / "s.bin")
    with pytest.raises(ValueError, match="--quant is for --format gguf"):
        ExportSpec(format="onnx", quant="q8_0")
    from types import SimpleNamespace

    with pytest.raises(KdcodeError, match="kdcode exports GPT-2"):
        arch_of(SimpleNamespace(model_type="mistral"))
    with pytest.raises(KdcodeError, match="tanh GELU"):
        arch_of(SimpleNamespace(model_type="gpt2", activation_function="gelu"))


def test_int8_folders_are_refused(student_src, tmp_path, corpus_dir):
    from kdcode.compression.compress import run_compress
    from kdcode.spec_compress import CompressSpec

    int8, _ = run_compress(str(student_src), CompressSpec(int8=True, data={"source": str(corpus_dir)}), tmp_path / "q")
    with pytest.raises(KdcodeError, match="export its float parent"):
        _export(int8, tmp_path / "q.gguf")


def test_a_failed_export_leaves_nothing_under_the_name(student_src, tmp_path, monkeypatch):
    import kdcode.export.run

    def broken(path, *a, **k):
        Path(path).write_bytes(b"GGUF half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kdcode.export.run, "write_gguf", broken)
    out = tmp_path / "s.gguf"
    with pytest.raises(KdcodeError, match="No space left"):
        _export(student_src, out)
    assert sorted(os.listdir(tmp_path)) == []


def _state(tmp_path: Path) -> dict[str, bytes | str]:
    """Every entry of the folder: a file's bytes, or "folder"."""
    return {p.name: "folder" if p.is_dir() else p.read_bytes() for p in sorted(tmp_path.iterdir())}


def test_overwrite_over_a_folder_at_the_modelfile_path_changes_nothing_and_names_it(student_src, tmp_path):
    out = tmp_path / "s.gguf"
    _export(student_src, out)
    modelfile_path(out).unlink()
    modelfile_path(out).mkdir()  # where the new Modelfile should go
    before = _state(tmp_path)
    with pytest.raises(KdcodeError, match=r"s\.Modelfile is a folder") as info:
        _export(student_src, out, "q8_0", overwrite=True)
    assert "s.gguf" not in str(info.value).replace("s.Modelfile", "")
    assert _state(tmp_path) == before  # the old GGUF still beside the sidecar that describes it; no temp files


def test_a_failure_moving_the_set_into_place_puts_the_old_files_back(student_src, tmp_path, monkeypatch):
    out = tmp_path / "s.gguf"
    _export(student_src, out)
    before = _state(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == modelfile_path(out) and ".tmp-" in Path(src).name:  # the new Modelfile, not the old one
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KdcodeError, match=r"cannot write .*s\.Modelfile: No space left"):
        _export(student_src, out, "q8_0", overwrite=True)
    assert _state(tmp_path) == before
    monkeypatch.undo()
    manifest = _export(student_src, out, "q8_0", overwrite=True)  # and then it works, all three replaced
    assert sorted(os.listdir(tmp_path)) == ["s.Modelfile", "s.gguf", "s.kdcode.json"]
    assert json.loads(sidecar_path(out).read_text()) == manifest
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and manifest["gguf"]["quant"] == "q8_0"


def test_files_set_aside_by_a_killed_run_are_put_back_or_deleted(tmp_path):
    import subprocess
    import sys

    from kdcode.export.fileset import recover_stale_backups

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out, other = tmp_path / "s.gguf", tmp_path / "s.kdcode.json"
    (tmp_path / f".s.gguf.old-{dead.pid}").write_bytes(b"old gguf")  # killed after setting it aside
    (tmp_path / f".s.kdcode.json.old-{dead.pid}").write_bytes(b"old json")
    other.write_bytes(b"new json")  # killed after moving the new one in
    (tmp_path / f".s.gguf.old-{os.getpid()}").write_bytes(b"ours")  # a live run's: left alone
    assert len(recover_stale_backups(out)) == 1 and len(recover_stale_backups(other)) == 1
    assert _state(tmp_path) == {f".s.gguf.old-{os.getpid()}": b"ours", "s.gguf": b"old gguf",
                                "s.kdcode.json": b"new json"}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_sidecar_and_modelfile_are_as_readable_as_the_gguf(student_src, tmp_path, umask):
    out = tmp_path / "s.gguf"
    old = os.umask(umask)
    try:
        _export(student_src, out)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["s.gguf", "s.kdcode.json", "s.Modelfile"], 0o644 & ~umask)
