"""`kdcode export --format onnx` and the onnxruntime backend (issues 19.2, 19.3): the decoder with past key values
through torch.onnx, run by ONNX Runtime under kdcode's own decoder, gives torch fp32's greedy completions, beams
and perplexity; int8 runs, smaller, with one int8 table for the tied embedding and head; the folder records where
it came from and is checked on load."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs ONNX Runtime: pip install 'kdcode[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX export (torch.onnx, dynamo) needs onnxscript: "
                    "pip install 'kdcode[onnx]'")

from conftest import run  # noqa: E402
from runtime_models import completions, differences, held_out_prompts, tiny_llama, two_layer_teacher  # noqa: E402

from kdcode.errors import KdcodeError  # noqa: E402
from kdcode.export.run import run_export  # noqa: E402
from kdcode.inference.loader import load_for_inference  # noqa: E402
from kdcode.models.artifacts import MANIFEST, weights_sha256  # noqa: E402
from kdcode.models.load import load_model  # noqa: E402
from kdcode.spec_compress import ExportSpec  # noqa: E402

pytestmark = pytest.mark.slow  # every test here exports a graph first (~10-30 s on 2 busy cores)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The two-layer cut of the bundled teacher, and its float and int8 ONNX exports."""
    root = tmp_path_factory.mktemp("onnx")
    src = two_layer_teacher(root / "t2")
    run_export(str(src), ExportSpec(format="onnx"), root / "t2-onnx")
    run_export(str(src), ExportSpec(format="onnx", int8=True), root / "t2-onnx-int8")
    return src, root / "t2-onnx", root / "t2-onnx-int8"


def test_greedy_from_the_onnx_export_equals_torch_fp32_on_100_held_out_prompts(real, corpus_dir):
    src, onnx, _ = real
    prompts = held_out_prompts(corpus_dir, 100)
    ref = completions(str(src), prompts)
    assert sum(ref.token_counts) > 500
    assert not differences(ref, completions(str(onnx), prompts))  # batches of 8, left-padded
    assert not differences(ref, completions(str(onnx), prompts[:20], batch_size=1))


def test_beams_and_perplexity_through_onnxruntime(real, corpus_dir):
    from kdcode.evaluation.evaluate import run_eval
    from kdcode.spec import EvalSpec

    src, onnx, _ = real
    prompts = held_out_prompts(corpus_dir, 8)
    assert completions(str(src), prompts, beams=3).token_ids == completions(str(onnx), prompts, beams=3).token_ids
    spec = EvalSpec(data={"source": str(corpus_dir)}, samples=10, max_new_tokens=8, ppl_blocks=4, device="cpu")
    torch_run, ort_run = run_eval(str(src), spec), run_eval(str(onnx), spec)
    assert abs(ort_run["perplexity"] - torch_run["perplexity"]) / torch_run["perplexity"] < 1e-4
    assert ort_run["runtime"]["backend"] == "onnxruntime" and ort_run["es"] == torch_run["es"]


def test_the_folder_records_its_source_and_is_checked_on_load(real, tmp_path):
    src, onnx, _ = real
    manifest = json.loads((onnx / MANIFEST).read_text())
    assert manifest["kind"] == "export" and manifest["format"] == "onnx"
    assert manifest["source"]["weights_sha256"] == weights_sha256(src)
    assert manifest["export"] == {"format": "onnx", "quant": None, "int8": False, "opset": 18}
    assert manifest["onnx"]["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "logits_index"]
    assert set(manifest["weights_sha256"]) == {"model.onnx"} and (onnx / "tokenizer.json").is_file()
    lm = load_for_inference(str(onnx), "cpu")
    assert lm.verified is True and lm.runtime["dtype"] == "float32" and lm.params == load_model(str(src)).params
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(onnx, changed)
    data = bytearray((changed / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (changed / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(KdcodeError, match="does not match the sha256"):
        load_for_inference(str(changed), "cpu")


def test_int8_runs_smaller_with_one_table_for_embedding_and_head(real, corpus_dir):
    src, onnx, int8 = real
    manifest = json.loads((int8 / MANIFEST).read_text())
    assert manifest["onnx"]["int8"]["embedding"] == "int8, shared with the LM head"
    assert manifest["bytes"] < manifest["source"]["params_m"] * 1e6 * 1.15  # about one byte a weight
    assert (int8 / "model.onnx").stat().st_size * 3.5 < (onnx / "model.onnx").stat().st_size
    prompts = held_out_prompts(corpus_dir, 40)
    ref, quant = completions(str(src), prompts), completions(str(int8), prompts)
    assert len(differences(ref, quant)) <= len(prompts) // 3
    assert load_for_inference(str(int8), "cpu").runtime["dtype"].startswith("int8")


def test_a_llama_family_onnx_export_equals_torch(tokenizer, corpus_dir, tmp_path):
    src = tiny_llama(tmp_path / "llama", tokenizer)
    run_export(str(src), ExportSpec(format="onnx"), tmp_path / "llama-onnx")
    prompts = held_out_prompts(corpus_dir, 40)
    ref = completions(str(src), prompts)
    assert not differences(ref, completions(str(tmp_path / "llama-onnx"), prompts))


def test_export_refuses_an_existing_folder_and_the_source(real, tmp_path):
    src, onnx, _ = real
    with pytest.raises(KdcodeError, match="not empty"):
        run_export(str(src), ExportSpec(format="onnx"), onnx)
    with pytest.raises(KdcodeError, match="lies inside the input MODEL"):
        run_export(str(src), ExportSpec(format="onnx"), src / "onnx")
    with pytest.raises(ValueError, match="--int8 is for --format onnx"):
        ExportSpec(format="gguf", int8=True)


def test_cli_export_onnx_then_eval(student_src, corpus_dir, tmp_path):
    out = tmp_path / "onnx-int8"
    made = run("export", str(student_src), "--format", "onnx", "--int8", "--out", str(out))
    assert made.exit_code == 0, made.output
    assert "ONNX export written to" in made.output and (out / "model.onnx").is_file()
    ev = run("eval", str(out), "--data", str(corpus_dir), "--samples", "5", "--max-new-tokens", "4",
             "--ppl-blocks", "2", "--json", str(tmp_path / "eval.json"))
    assert ev.exit_code == 0, ev.output
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["runtime"]["backend"] == "onnxruntime" and result["perplexity"] > 1
    again = run("export", str(student_src), "--format", "onnx", "--out", str(out))
    assert again.exit_code == 2 and "not empty" in again.output


def test_ollama_lists_an_onnx_export_by_its_own_files(student_src, tmp_path):
    """/api/tags and /api/show of an ONNX export: the bytes, format and last change of model.onnx, where they said
    0 bytes, "safetensors" and the time of the request."""
    import os

    from fastapi.testclient import TestClient

    from kdcode.inference.engine import load_engine
    from kdcode.inference.server import create_app

    out = tmp_path / "onnx"
    manifest = run_export(str(student_src), ExportSpec(format="onnx"), out)[1]
    for name in manifest["onnx"]["files"]:
        os.utime(out / name, (1_700_000_000, 1_700_000_000))
    engine = load_engine(str(out), device="cpu", warm_up=False)
    with TestClient(create_app(str(out), engine=engine, model_name="m")) as client:
        tags = client.get("/api/tags").json()["models"]
        show = client.post("/api/show", json={"name": "m"}).json()
    assert tags[0]["size"] == manifest["bytes"] > 0 and tags[0]["details"]["format"] == "onnx"
    assert tags[0]["modified_at"] == show["modified_at"] == "2023-11-14T22:13:20.000Z"
    assert show["details"]["format"] == "onnx"
