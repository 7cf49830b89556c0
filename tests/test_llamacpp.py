"""The llama.cpp backend (issue 19.3): a GGUF export run by llama.cpp under kdcode's own decoder gives torch
fp32's greedy completions, beams and perplexity; llama.cpp's own tokenizer agrees with transformers on the
exported vocabulary (what ollama will use); q8_0 runs; the CLI commands take a .gguf file."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf", reason="GGUF export needs the gguf package: pip install 'kdcode[gguf]'")
llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python: "
                                "pip install 'kdcode[llamacpp]'")

from conftest import run  # noqa: E402
from runtime_models import completions, differences, held_out_prompts, tiny_llama, two_layer_teacher  # noqa: E402

from kdcode.errors import KdcodeError  # noqa: E402
from kdcode.export.run import run_export, sidecar_path  # noqa: E402
from kdcode.inference.loader import load_for_inference  # noqa: E402
from kdcode.spec_compress import ExportSpec  # noqa: E402


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The two-layer cut of the bundled teacher, and its f32 and q8_0 GGUF exports."""
    root = tmp_path_factory.mktemp("gguf")
    src = two_layer_teacher(root / "t2")
    for quant in ("f32", "q8_0"):
        run_export(str(src), ExportSpec(format="gguf", quant=quant), root / f"t2.{quant}.gguf")
    return src, root / "t2.f32.gguf", root / "t2.q8_0.gguf"


@pytest.fixture(scope="module")
def tiny_gguf(student_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "s.gguf"
    run_export(str(student_src), ExportSpec(format="gguf"), out)
    return out


def _llama_tokenize(model, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    data = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    assert n >= 0
    return list(buf[:n])


def test_llama_cpp_tokenizes_the_exported_vocabulary_as_transformers(tiny_gguf, tokenizer, corpus_dir):
    lm = load_for_inference(str(tiny_gguf), "cpu")
    assert lm.runtime["backend"] == "llama.cpp" and lm.runtime["dtype"] == "f32 (GGUF)" and lm.verified is True
    for path in sorted(corpus_dir.glob("*.py"))[:6]:
        text = path.read_text(encoding="utf-8")
        assert _llama_tokenize(lm.model, text) == tokenizer(text, add_special_tokens=False)["input_ids"], path.name


@pytest.mark.slow
def test_greedy_from_the_f32_gguf_equals_torch_fp32_on_100_held_out_prompts(real, corpus_dir):
    """llama.cpp's GELU reads an fp16 table, so a near-tie between two tokens can flip (the full 12-layer teacher
    flips 1 of 100 such completions); this two-layer model has none on these prompts."""
    src, f32, _ = real
    prompts = held_out_prompts(corpus_dir, 100)
    ref = completions(str(src), prompts)
    assert sum(ref.token_counts) > 500  # real completions, not all empty lines
    assert not differences(ref, completions(str(f32), prompts))  # batches of 8, left-padded
    assert not differences(ref, completions(str(f32), prompts[:20], batch_size=1))


@pytest.mark.slow
def test_beam_search_and_perplexity_through_llama_cpp(real, corpus_dir):
    from kdcode.evaluation.evaluate import run_eval
    from kdcode.spec import EvalSpec

    src, f32, _ = real
    prompts = held_out_prompts(corpus_dir, 8)
    ref = completions(str(src), prompts, beams=3)
    assert ref.token_ids == completions(str(f32), prompts, beams=3).token_ids  # rows reordered by seq_cp
    spec = EvalSpec(data={"source": str(corpus_dir)}, samples=10, max_new_tokens=8, ppl_blocks=4, device="cpu")
    torch_ppl, cpp_ppl = run_eval(str(src), spec)["perplexity"], run_eval(str(f32), spec)["perplexity"]
    assert abs(cpp_ppl - torch_ppl) / torch_ppl < 2e-3


@pytest.mark.slow
def test_a_llama_family_gguf_equals_torch(tokenizer, corpus_dir, tmp_path):
    src = tiny_llama(tmp_path / "llama", tokenizer)
    run_export(str(src), ExportSpec(format="gguf"), tmp_path / "llama.gguf")
    prompts = held_out_prompts(corpus_dir, 100)
    ref = completions(str(src), prompts)
    assert sum(ref.token_counts) > 500
    assert not differences(ref, completions(str(tmp_path / "llama.gguf"), prompts))


@pytest.mark.slow
def test_q8_0_runs_close_to_f32(real, corpus_dir):
    src, f32, q8 = real
    prompts = held_out_prompts(corpus_dir, 40)
    ref, quant = completions(str(src), prompts), completions(str(q8), prompts)
    assert len(differences(ref, quant)) <= len(prompts) // 4  # 8-bit weights move a few near-ties, not most
    assert load_for_inference(str(q8), "cpu").runtime["dtype"] == "q8_0 (GGUF)"
    assert q8.stat().st_size < f32.stat().st_size / 3


def test_one_live_cache_per_model_and_rows_grow_for_a_prompt(tiny_gguf):
    import torch

    model = load_for_inference(str(tiny_gguf), "cpu").model
    ids = torch.tensor([[5, 6, 7]])
    mask, pos = torch.ones_like(ids), torch.arange(3)[None]
    _, old = model.decode_step(ids, mask, pos, None, 1)
    model.decode_step(ids, mask, pos, None, 1)
    with pytest.raises(KdcodeError, match="replaced by a newer prompt"):
        model.decode_step(ids[:, :1], torch.ones(1, 4, dtype=torch.long), pos[:, :1] + 3, old, 1)
    many = ids.repeat(20, 1)
    logits, cache = model.decode_step(many, torch.ones_like(many), pos.repeat(20, 1), None, 2)
    assert logits.shape == (20, 2, 512) and model.rows >= 20 and cache.get_seq_length() == 3
    assert torch.allclose(logits[0], logits[19])


def test_the_context_holds_what_is_decoded_not_the_model_s_whole_context(tiny_gguf, monkeypatch):
    """A model's context length (8k for SmolLM2, 128k for many) times the rows would be gigabytes of float32 KV
    cache: a context starts with ROW_POSITIONS cells per row and grows for a prompt that needs more."""
    import torch

    from kdcode.inference.backends import llama

    monkeypatch.setattr(llama, "ROW_POSITIONS", 32)  # (llama.cpp pads a context to a multiple of 256 cells)
    monkeypatch.setattr(llama, "HEADROOM", 24)
    model = load_for_inference(str(tiny_gguf), "cpu").model
    assert model.n_positions > 64 and model.row_positions == 32
    assert llama_cpp.llama_n_ctx(model.ctx) == 32 * llama.START_ROWS
    ids = torch.arange(5, 45)[None]  # 40 prompt tokens + 24 headroom: 64 cells per row
    logits, cache = model.decode_step(ids, torch.ones_like(ids), torch.arange(40)[None], None, 1)
    assert model.row_positions == 64 and llama_cpp.llama_n_ctx(model.ctx) == 64 * llama.START_ROWS
    small = load_for_inference(str(tiny_gguf), "cpu").model  # the same logits as a context made large at once
    small.row_positions = model.n_positions
    small._context(llama.START_ROWS)
    ref, _ = small.decode_step(ids, torch.ones_like(ids), torch.arange(40)[None], None, 1)
    assert torch.allclose(logits, ref)


def test_a_changed_gguf_is_refused_unless_no_verify(tiny_gguf, tmp_path):
    copy = tmp_path / "c.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[-100] ^= 0xFF  # one weight byte changed
    copy.write_bytes(bytes(data))
    sidecar_path(copy).write_text(sidecar_path(tiny_gguf).read_text())
    with pytest.raises(KdcodeError, match="does not match the sha256"):
        load_for_inference(str(copy), "cpu")
    assert load_for_inference(str(copy), "cpu", verify=False).verified is False
    sidecar_path(copy).unlink()
    assert load_for_inference(str(copy), "cpu").verified is None  # a GGUF made elsewhere: nothing to check against


@pytest.mark.slow
def test_cli_export_then_complete_eval_and_bench_a_gguf(student_src, corpus_dir, tmp_path):
    out = tmp_path / "s.gguf"
    made = run("export", str(student_src), "--format", "gguf", "--quant", "q8_0", "--out", str(out))
    assert made.exit_code == 0, made.output
    assert "ollama create" in made.output and (tmp_path / "s.Modelfile").is_file()
    done = run("complete", str(out), "--json", "--max-tokens", "4", input="import os\n")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["runtime"]["backend"] == "llama.cpp"
    ev = run("eval", str(out), "--data", str(corpus_dir), "--samples", "5", "--max-new-tokens", "4",
             "--ppl-blocks", "2", "--json", str(tmp_path / "eval.json"))
    assert ev.exit_code == 0, ev.output
    assert json.loads((tmp_path / "eval.json").read_text())["runtime"]["dtype"] == "q8_0 (GGUF)"
    bench = run("bench", str(out), "--compare", str(student_src), "--data", str(corpus_dir),
                "--prompts", "2", "--rounds", "2", "--new-tokens", "3", "--json",
                str(tmp_path / "bench.json"))
    assert bench.exit_code == 0, bench.output
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["backend"] == "llama.cpp" and result["compare"]["backend"] == "torch"
    assert result["size_mb"] == round(out.stat().st_size / 1e6, 3) and result["params_m"] > 0


def test_a_fim_models_gguf_infills_as_the_folder_does(fim_teacher_dir, tmp_path):
    """The GGUF of a FIM model carries llama.cpp's FIM token keys, its manifest's FIM section (so `auto` picks the
    order it was trained in), and an ollama template that infills when a request has a suffix."""
    import shutil

    from transformers import AutoTokenizer

    from kdcode.export.gguf_file import gguf_manifest, read_fields
    from kdcode.export.run import modelfile_path
    from kdcode.inference.engine import load_engine
    from kdcode.models.artifacts import read_manifest, write_json

    folder = tmp_path / "spm_model"
    shutil.copytree(fim_teacher_dir, folder)
    write_json(folder / "kdcode.json", {**(read_manifest(folder) or {}),
                                        "fim": {"rate": 0.5, "spm_rate": 0.5, "format": "starcoder"}})
    out = tmp_path / "f.gguf"
    run_export(str(folder), ExportSpec(format="gguf", quant="f32"), out, verify=False)
    fields = read_fields(out)
    tok = AutoTokenizer.from_pretrained(folder)
    assert fields["tokenizer.ggml.fim_pre_token_id"] == tok.convert_tokens_to_ids("<fim_prefix>")
    assert fields["tokenizer.ggml.fim_suf_token_id"] == tok.convert_tokens_to_ids("<fim_suffix>")
    assert fields["tokenizer.ggml.fim_mid_token_id"] == tok.convert_tokens_to_ids("<fim_middle>")
    assert gguf_manifest(fields)["fim"]["spm_rate"] == 0.5
    text = modelfile_path(out).read_text()
    assert ('TEMPLATE "{{ if .Suffix }}<fim_prefix><fim_suffix>{{ .Suffix }}<fim_middle>{{ .Prompt }}'
            '{{ else }}{{ .Prompt }}{{ end }}"') in text
    folder_engine = load_engine(str(folder), device="cpu", warm_up=False, verify=False)
    gguf_engine = load_engine(str(out), device="cpu", warm_up=False, runtime={"backend": "llama.cpp"})
    assert folder_engine.fim_order == gguf_engine.fim_order == "spm"
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    got = [e.complete(prefix, 6, suffix=suffix).choices[0].text for e in (folder_engine, gguf_engine)]
    assert got[0] == got[1]
