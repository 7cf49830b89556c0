"""Backends and the lean torch decode path (issue 19.3, 19.5): a static KV cache and a compiled decode step give
the tokens the growing cache gives; backends are picked from the path, asked for by flag, and refused with one
line when they do not fit; bench, eval and complete report the backend they ran on."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import run
from runtime_models import completions, differences, held_out_prompts

from kdcode.errors import KdcodeError
from kdcode.inference.backends import detect_backend
from kdcode.inference.loader import load_for_inference
from kdcode.spec import BenchSpec, RuntimeSpec


@pytest.mark.slow
def test_static_cache_greedy_and_beams_equal_the_growing_cache(teacher_dir, corpus_dir):
    prompts = held_out_prompts(corpus_dir, 24)
    for batch in (1, 8):  # one row, and left-padded rows
        ref = completions(str(teacher_dir), prompts, batch)
        static = completions(str(teacher_dir), prompts, batch, kv_cache="static")
        assert not differences(ref, static)
        assert sum(ref.token_counts) > 2 * len(prompts)  # completions of some length, not all stopped at once
    ref = completions(str(teacher_dir), prompts[:4], beams=3)
    assert ref.token_ids == completions(str(teacher_dir), prompts[:4], beams=3, kv_cache="static").token_ids


def test_static_cache_reports_itself_and_counts_the_same_model(teacher_dir):
    lm = load_for_inference(str(teacher_dir), "cpu", "auto", 1, runtime={"kv_cache": "static"})
    plain = load_for_inference(str(teacher_dir), "cpu", "auto", 1)
    assert lm.runtime["kv_cache"] == "static" and lm.runtime["backend"] == "torch" and not lm.runtime["compile"]
    assert lm.params == plain.params and lm.runtime["dtype"] == plain.runtime["dtype"] == "float32"
    assert lm.model.weight_bytes == sum(p.stat().st_size for p in teacher_dir.glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_compiled_decode_step_equals_eager(teacher_dir, corpus_dir):
    pytest.importorskip("torch._inductor", reason="torch.compile needs inductor")
    prompts = held_out_prompts(corpus_dir, 12)
    ref = completions(str(teacher_dir), prompts, 4)
    compiled = completions(str(teacher_dir), prompts, 4, compile=True)
    assert not differences(ref, compiled)


def test_runtime_spec_refuses_torch_options_for_other_backends():
    with pytest.raises(ValueError, match="torch options"):
        RuntimeSpec(backend="llama.cpp", compile=True)
    with pytest.raises(ValueError):
        RuntimeSpec(backend="tensorrt")
    assert RuntimeSpec(compile=True).backend == "auto"


def test_backend_is_detected_from_the_path(tmp_path, teacher_dir):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"x")
    assert detect_backend(str(gguf)) == "llama.cpp"
    assert detect_backend(str(onnx)) == "onnxruntime"
    assert detect_backend(str(teacher_dir)) == "torch" and detect_backend("bundled") == "torch"


def test_a_backend_that_does_not_fit_is_one_line(tmp_path, teacher_dir):
    with pytest.raises(KdcodeError, match="not a kdcode ONNX export"):
        load_for_inference(str(teacher_dir), "cpu", runtime={"backend": "onnxruntime"})
    with pytest.raises(KdcodeError, match="runs a GGUF file"):
        load_for_inference(str(teacher_dir), "cpu", runtime={"backend": "llama.cpp"})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    # --backend torch runs a GGUF dequantized through transformers: this 4-byte one is damaged, in one line
    with pytest.raises(KdcodeError, match=r"cannot read GGUF file .*m\.gguf.*truncated or damaged"):
        load_for_inference(str(gguf), "cpu", runtime={"backend": "torch"})
    with pytest.raises(KdcodeError, match="--dtype fp16 is for torch"):
        load_for_inference(str(gguf), "cpu", "fp16")


def test_missing_extras_are_named(monkeypatch, tmp_path, teacher_dir):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"x")
    (onnx / "kdcode.json").write_text('{"format": "onnx"}')
    for name in ("llama_cpp", "gguf", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(KdcodeError, match=r"pip install 'kdcode\[llamacpp\]'"):
        load_for_inference(str(gguf), "cpu")
    with pytest.raises(KdcodeError, match=r"pip install 'kdcode\[onnx\]'"):
        load_for_inference(str(onnx), "cpu")
    from kdcode.export.run import run_export
    from kdcode.spec_compress import ExportSpec

    with pytest.raises(KdcodeError, match=r"--format gguf needs gguf: pip install 'kdcode\[gguf\]'"):
        run_export(str(teacher_dir), ExportSpec(format="gguf"), tmp_path / "t.gguf")
    with pytest.raises(KdcodeError, match=r"--format onnx needs .*onnxscript.*: pip install 'kdcode\[onnx\]'"):
        run_export(str(teacher_dir), ExportSpec(format="onnx"), tmp_path / "t-onnx")


@pytest.mark.slow
def test_cli_flags_reach_the_runtime(teacher_dir):
    result = run("complete", str(teacher_dir), "--json", "--kv-cache", "static", "--max-tokens", "4",
                 "--device", "cpu", input="import os\n")
    assert result.exit_code == 0, result.output
    runtime = json.loads(result.output)["runtime"]
    assert runtime["backend"] == "torch" and runtime["kv_cache"] == "static"
    bad = run("bench", str(teacher_dir), "--backend", "llama.cpp", "--compile")
    assert bad.exit_code == 2 and "torch options" in bad.output
    for command in ("eval", "bench", "complete", "serve"):
        help_text = run(command, "--help", terminal_width=200).output
        assert "--backend" in help_text and "--kv-cache" in help_text and "--compile" in help_text


def test_bench_gives_each_model_its_own_runtime(teacher_dir, corpus_dir):
    from kdcode.evaluation.bench import run_bench_many

    spec = BenchSpec(data={"source": str(corpus_dir)}, prompts=2, rounds=2, new_tokens=3, warmup=1, device="cpu")
    dynamic, static = run_bench_many([str(teacher_dir)] * 2, spec, isolate=False,
                                     runtimes=[None, {"kv_cache": "static"}])
    assert dynamic["runtime"]["kv_cache"] == "dynamic" and static["runtime"]["kv_cache"] == "static"
    assert dynamic["backend"] == static["backend"] == "torch"
    assert dynamic["size_mb"] == static["size_mb"] > 0 and dynamic["params_m"] == static["params_m"]


def _benchmark_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "runtimes.py"
    spec = importlib.util.spec_from_file_location("runtimes_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(speed: float, spread: float = 0.05, **kw) -> dict:
    return {"samples_per_s": speed, "samples_per_s_range": [speed * (1 - spread), speed * (1 + spread)],
            "ms_per_token_p50": 1.0, **kw}


def test_the_runtimes_benchmark_checks_the_issue_goals_on_its_table():
    script = _benchmark_script()
    rows = {
        ("teacher", "ort-fp32"): _row(10.0, size_mb=14.0, es=40.0),
        ("student", "torch-fp32"): _row(9.0, size_mb=9.0, es=34.0, line_ms_p50=80.0),
        ("student", "ort-fp32"): _row(23.0, size_mb=9.2, es=34.0, line_ms_p50=45.0),
        ("student", "ort-int8"): _row(36.0, size_mb=2.5, es=33.5, line_ms_p50=35.0),
        ("student", "llama-f32"): _row(14.0, size_mb=9.4, es=34.0, tensor_mb=9.1),
        ("student", "llama-q8_0"): _row(19.0, size_mb=2.8, es=33.9, tensor_mb=2.5),
    }
    goals = script.check_goals(rows)
    assert goals[0].startswith("PASS student vs teacher in the fastest backend (onnxruntime, ort-fp32): 2.30x")
    assert any(g.startswith("PASS 8-bit ort-int8 vs ort-fp32: 1.57x") for g in goals)
    q8 = next(g for g in goals if "llama-q8_0" in g)
    assert q8.startswith("FAIL") and "3.36x smaller" in q8 and "tensors alone: 3.64x" in q8
    assert goals[-1].startswith("PASS line completion of the fastest student (ort-int8): p50 35.0 ms")
    table = script.markdown(rows, ["header"], goals)
    assert "| student | onnxruntime | int8 | past key values | 2.5 | 36.0 [" in table
    assert table.count("\n| ") == len(rows) + 1 and "Goals:" in table
