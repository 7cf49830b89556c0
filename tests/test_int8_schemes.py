"""int8 schemes (per-tensor, per-token, weight-only, smoothquant, smooth-per-token): round trips, what each does to
outliers, old folders, and the quality check `kdcode compress` / `kdcode export` run before they report success."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from runtime_models import tiny_llama
from typer.testing import CliRunner

from kdcode.cli import app
from kdcode.compression import int8_kernels
from kdcode.compression.compress import calibration_blocks, run_compress
from kdcode.compression.int8 import INT8_SCHEME, Int8Linear, dequantize_int8, quantize_model
from kdcode.compression.quality import compare, quality_lines
from kdcode.compression.smooth import largest_channels, smooth_model
from kdcode.errors import KdcodeError
from kdcode.models.load import load_model
from kdcode.spec import DataSpec
from kdcode.spec_compress import INT8_SCHEMES, CompressSpec, QualityCheckSpec

runner = CliRunner(env={"COLUMNS": "120", "TERM": "dumb"})
SCHEMES = ("per-tensor", "per-token", "weight-only", "smoothquant", "smooth-per-token")


def spec(corpus_dir: Path, **kw) -> CompressSpec:
    kw = {"check_samples": 0, "check_blocks": 0, **kw}
    return CompressSpec(data=DataSpec(source=str(corpus_dir)), calib_batches=2, calib_batch_size=2,
                        calib_block_size=32, **kw)


def ids(vocab: int, n: int = 3, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "llama", tokenizer)


# ------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("activations", int8_kernels.ACTIVATIONS)
@pytest.mark.parametrize("rows", [1, 5, 40])  # decoding, a short batch, a prompt (weight-only dequantizes)
def test_every_kernel_computes_the_dequantized_product(activations, rows):
    with torch.random.fork_rng():  # the same weights whatever ran before (the tolerance is 2x the worst of 200 seeds)
        torch.manual_seed(rows)
        lin = torch.nn.Linear(48, 40)
    q8 = Int8Linear.from_float(lin, activations)
    q, scale, bias = q8.unpacked()
    x = torch.randn(2, rows, 48, generator=torch.Generator().manual_seed(rows))
    ref = x @ dequantize_int8(q, scale).T + bias
    err = (q8(x) - ref).abs().max()
    tol = {"weight-only": 1e-4, "per-token": 0.025, "per-tensor": 0.05}[activations]
    assert err < tol * ref.abs().max()


def test_per_token_keeps_the_other_tokens_when_one_token_is_an_outlier():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    x[3] *= 1000.0  # one token with massive activations (a Llama's first token does this)
    errors = {}
    for activations in ("per-tensor", "per-token"):
        q8 = Int8Linear.from_float(lin, activations)
        q, scale, bias = q8.unpacked()
        ref = x @ dequantize_int8(q, scale).T + bias
        others = torch.arange(16) != 3
        errors[activations] = float(((q8(x) - ref)[others]).abs().max() / ref[others].abs().max())
    assert errors["per-token"] < 0.01 < errors["per-tensor"]
    assert errors["per-token"] < errors["per-tensor"] / 20


def _logit_error(model: torch.nn.Module, activations: str, x: torch.Tensor) -> float:
    """Largest logit error of the int8 model, relative to the largest logit, on every token but the first."""
    q8 = copy.deepcopy(model)
    quantize_model(q8, activations)
    with torch.no_grad():
        ref, got = model(x).logits[:, 1:], q8(x).logits[:, 1:]
    return float((got - ref).abs().max() / ref.abs().max())


def test_per_token_beats_per_tensor_on_a_model_with_an_outlier_token(llama_dir):
    model = load_model(str(llama_dir)).model
    x = ids(model.config.vocab_size)
    errors = {a: _logit_error(model, a, x) for a in int8_kernels.ACTIVATIONS}

    def outlier(_module, _args, out):  # the first token's MLP input 1000x larger (a Llama's first token does this)
        out = out.clone()
        out[:, 0] *= 1000.0
        return out

    model.model.layers[0].post_attention_layernorm.register_forward_hook(outlier)  # kept by quantize_model
    hit = {a: _logit_error(model, a, x) for a in int8_kernels.ACTIVATIONS}
    assert hit["per-tensor"] > 5 * errors["per-tensor"]  # one token's scale is every token's
    assert hit["per-token"] < 2 * errors["per-token"] and hit["per-token"] < hit["per-tensor"] / 5
    assert hit["weight-only"] < hit["per-token"]


def test_smoothquant_keeps_the_float_model_and_tames_an_outlier_channel(llama_dir, corpus_dir):
    model = load_model(str(llama_dir)).model
    with torch.no_grad():  # one channel of every norm's output 50x larger, the readers' columns 50x smaller
        for block in model.model.layers:
            for norm, readers in ((block.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (block.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[5] *= 50.0
                for r in readers:
                    getattr(block.self_attn if r[0] in "qkv" else block.mlp, r).weight[:, 5] /= 50.0
    x = ids(model.config.vocab_size)
    plain = _logit_error(model, "per-tensor", x)
    smoothed = copy.deepcopy(model)
    step = smooth_model(smoothed, x, 2, 0.5)
    assert step["groups"] == 3 * 2 and step["alpha"] == 0.5
    with torch.no_grad():
        assert torch.allclose(smoothed(x).logits, model(x).logits, atol=1e-4)
    assert _logit_error(smoothed, "per-tensor", x) < plain / 2
    # per token, one outlier channel still sets every token's step: the migration helps there too
    assert _logit_error(smoothed, "per-token", x) < _logit_error(model, "per-token", x)


def test_float_channels_take_an_outlier_channel_out_of_every_token_s_scale():
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.1)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 200.0  # one channel of every token carries values hundreds of times the rest
    errors = {}
    for channels in (None, [5]):
        q8 = Int8Linear.from_float(lin, "per-token", channels)
        q, scale, bias = q8.unpacked()
        assert torch.equal(q, Int8Linear.from_float(lin, "per-token").unpacked()[0])  # the same stored weights
        ref = x @ dequantize_int8(q, scale).T + bias
        errors[str(channels)] = float((q8(x) - ref).abs().max() / ref.abs().max())
    assert errors["[5]"] < errors["None"] / 20
    with pytest.raises(KdcodeError, match="per-token"):
        Int8Linear.from_float(lin, "weight-only", [5])
    with pytest.raises(KdcodeError, match="within 0-63"):
        Int8Linear.from_float(lin, "per-token", [64])
    with pytest.raises(KdcodeError, match="within 0-63"):  # a manifest edited by hand: still one line
        Int8Linear.from_float(lin, "per-token", ["5"])


def test_an_untied_head_keeps_its_float_channels_and_the_layout_rebuilds_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcode.compression.int8 import apply_int8_layout

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    layout = quantize_model(model, "per-token", [3, 1, 7])
    assert layout["tied"] is None and "lm_head" in layout["modules"] and layout["head_float_channels"] == [1, 3, 7]
    channels = {n: m.float_channels for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert channels.pop("lm_head") == [1, 3, 7] and set(channels.values()) == {None}
    assert "3 input channels" in layout["scheme"]
    skeleton = LlamaForCausalLM(config).eval()
    apply_int8_layout(skeleton, layout)
    skeleton.load_state_dict(model.state_dict())
    x = ids(64)
    with torch.no_grad():
        assert torch.equal(skeleton(x).logits, model(x).logits)


# ------------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_round_trips_to_the_logits_it_had_in_memory(tmp_path, llama_dir, corpus_dir, scheme):
    s = spec(corpus_dir, int8=True, int8_scheme=scheme)
    out, m = run_compress(str(llama_dir), s, tmp_path / scheme)
    layout = m["compression"]["layout"]["int8"]
    smooth, activations, head_float = INT8_SCHEMES[scheme]
    assert activations == {"smoothquant": "per-tensor", "smooth-per-token": "per-token"}.get(scheme, scheme)
    assert head_float == (16 if scheme == "smooth-per-token" else 0)
    channels = layout["head_float_channels"]
    assert layout["activations"] == activations and len(channels or []) == head_float
    assert layout["tied"] is not None
    assert [st["step"] for st in m["compression"]["steps"]] == ["smooth"] * smooth + ["int8"]
    lm = load_model(str(llama_dir))
    in_memory = lm.model.float()
    calib = calibration_blocks(s, lm.tokenizer, 128)
    if smooth:
        smooth_model(in_memory, calib, s.calib_batch_size, s.smooth_alpha)
    if head_float:  # the head's channels of largest calibration inputs, after the migration
        assert channels == largest_channels(in_memory, in_memory.get_output_embeddings(), calib, 2, head_float)
    quantize_model(in_memory, activations, channels)
    back = load_model(str(out))
    assert back.verified is True
    assert {m.activations for m in back.model.modules() if isinstance(m, Int8Linear)} == {activations}
    assert back.model.get_output_embeddings().float_channels == channels
    x = ids(lm.model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, in_memory(x).logits)


def test_old_per_tensor_folders_still_load(tmp_path, teacher_dir, corpus_dir):
    out, _ = run_compress(str(teacher_dir), spec(corpus_dir, int8=True, int8_scheme="per-tensor"), tmp_path / "q")
    path = out / "kdcode.json"
    manifest = json.loads(path.read_text())
    comp = manifest["compression"]  # as kdcode wrote it before schemes and quality existed
    for key in ("int8_scheme", "smooth_alpha", "check_samples", "check_blocks", "max_es_drop", "max_ppl_rise"):
        del comp["spec"][key]
    del comp["layout"]["int8"]["activations"], comp["layout"]["int8"]["head_float_channels"]
    comp["layout"]["int8"]["scheme"] = comp["steps"][0]["scheme"] = INT8_SCHEME
    del comp["steps"][0]["int8_scheme"]
    path.write_text(json.dumps(manifest))
    old = load_model(str(out))
    assert old.verified is True
    assert {m.activations for m in old.model.modules() if isinstance(m, Int8Linear)} == {"per-tensor"}
    assert old.model.get_output_embeddings().activations == "per-tensor"
    assert old.model.get_output_embeddings().float_channels is None
    ref = load_model(str(teacher_dir)).model
    quantize_model(ref, "per-tensor")
    x = ids(ref.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(old.model(x).logits, ref(x).logits)


# ------------------------------------------------------------------------------------------- quality
def test_compare_warns_beyond_either_threshold():
    check = QualityCheckSpec(max_es_drop=1.0, max_ppl_rise=3.0)
    before = {"es": 40.0, "em": 10.0, "perplexity": 10.0, "samples": 32, "ppl_tokens": 4000}
    fine = compare(before, {**before, "es": 39.5, "perplexity": 10.2}, check, "int8 (per-token)")
    assert fine["within_thresholds"] and fine["warning"] is None
    assert (fine["es_delta"], fine["perplexity_change_pct"]) == (-0.5, 2.0)
    bad = compare(before, {**before, "es": 38.0, "perplexity": 10.5}, check, "int8 (per-tensor)")
    assert not bad["within_thresholds"]
    assert bad["warning"] == ("int8 (per-tensor) lost quality beyond the thresholds: ES -2.00 (more than 1 lost), "
                              "perplexity +5.0% (more than 3% gained)")
    assert quality_lines(bad) == ["quality: ES 40.00 -> 38.00 (-2.00, 32 held-out samples); perplexity 10.000 -> "
                                  "10.500 (+5.0%, 4,000 held-out tokens)"]
    better = compare(before, {**before, "es": 41.0, "perplexity": 9.0}, QualityCheckSpec(max_es_drop=0,
                     max_ppl_rise=0), "x")
    assert better["warning"] is None  # a gain is never a loss


def _compress_cli(teacher: Path, corpus_dir: Path, out: Path, *extra: str):
    return runner.invoke(app, ["compress", str(teacher), "--out", str(out), "--int8", "--data", str(corpus_dir),
                               "--calib-batches", "1", "--calib-batch-size", "2", "--calib-block-size", "32",
                               "--check-samples", "4", "--check-blocks", "2", *extra])


def test_compress_prints_and_records_the_quality_before_and_after(tmp_path, teacher_dir, corpus_dir):
    r = _compress_cli(teacher_dir, corpus_dir, tmp_path / "q", "--max-es-drop", "100", "--max-ppl-rise", "100")
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "q" / "kdcode.json").read_text())["compression"]["quality"]
    assert q["before"]["samples"] == q["after"]["samples"] == 4 and q["before"]["ppl_tokens"] > 0
    assert q["es_delta"] == round(q["after"]["es"] - q["before"]["es"], 2)
    assert q["within_thresholds"] is True and q["warning"] is None
    assert q["thresholds"] == {"max_es_drop": 100.0, "max_ppl_rise_pct": 100.0}
    line = f"quality: ES {q['before']['es']:.2f} -> {q['after']['es']:.2f} ({q['es_delta']:+.2f}, 4 held-out samples)"
    assert line in r.output and "warning" not in r.output


class _Broken:
    """A kernel with the sign wrong, 8x too large: what a bad scheme looks like from outside."""

    def __init__(self, q, scale, bias) -> None:
        self.real = int8_kernels.PerToken(q, scale, bias)

    def __call__(self, x):
        return -8.0 * self.real(x)

    def unpacked(self):
        return self.real.unpacked()


def test_compress_warns_when_the_loss_is_beyond_the_thresholds(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    monkeypatch.setitem(int8_kernels.KERNELS, "per-token", _Broken)
    r = _compress_cli(teacher_dir, corpus_dir, tmp_path / "bad", "--int8-scheme", "per-token")
    assert r.exit_code == 0, r.output  # written and reported; the warning says what it lost
    assert "warning: int8 (per-token) lost quality beyond the thresholds: " in r.output
    assert "perplexity +" in r.output and "(more than 3% gained)" in r.output
    q = json.loads((tmp_path / "bad" / "kdcode.json").read_text())["compression"]["quality"]
    assert q["within_thresholds"] is False and q["perplexity_change_pct"] > 3


def test_checks_can_be_skipped_and_bad_schemes_are_one_line(tmp_path, teacher_dir, corpus_dir):
    out, m = run_compress(str(teacher_dir), spec(corpus_dir, int8=True), tmp_path / "q")
    assert "quality" not in m["compression"]
    r = runner.invoke(app, ["compress", str(teacher_dir), "--out", str(tmp_path / "x"), "--int8",
                            "--int8-scheme", "per-channel"])
    assert r.exit_code == 2 and "--int8-scheme: Input should be" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["compress", str(teacher_dir), "--out", str(tmp_path / "x"), "--int8",
                            "--check-samples", "-1"])
    assert r.exit_code == 2 and "--check-samples: Input should be" in r.output


def test_smoothquant_refuses_an_architecture_it_cannot_fold(tmp_path, corpus_dir, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from kdcode.errors import KdcodeError

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64))
    with pytest.raises(KdcodeError, match="smoothquant and smooth-per-token support GPT-2 and Llama-style blocks"):
        smooth_model(model, ids(64), 2, 0.5)


@pytest.mark.parametrize("int8_dot", [True, False])
def test_auto_is_smooth_per_token_only_where_it_pays_and_applies(tmp_path, llama_dir, corpus_dir, monkeypatch,
                                                                 int8_dot):
    monkeypatch.setattr("kdcode.compression.smooth.cpu_has_int8_dot", lambda: int8_dot)
    assert CompressSpec().int8_scheme == "auto"
    out, m = run_compress(str(llama_dir), spec(corpus_dir, int8=True), tmp_path / "auto")
    step = m["compression"]["steps"][-1]
    want = "smooth-per-token" if int8_dot else "weight-only"
    assert step["int8_scheme"] == want and step["chosen_by"].startswith("auto: ")
    assert ("no int8 dot products" in step["chosen_by"]) is not int8_dot
    assert [st["step"] for st in m["compression"]["steps"]] == ["smooth"] * int8_dot + ["int8"]
    layout = m["compression"]["layout"]["int8"]
    assert layout["activations"] == ("per-token" if int8_dot else "weight-only")
    assert len(layout["head_float_channels"] or []) == (16 if int8_dot else 0)
    # a scheme named on the command line is taken as it is, on any CPU
    _, named = run_compress(str(llama_dir), spec(corpus_dir, int8=True, int8_scheme="per-token"), tmp_path / "n")
    assert named["compression"]["steps"][-1]["int8_scheme"] == "per-token"
    assert named["compression"]["steps"][-1]["chosen_by"] is None


def test_auto_falls_back_to_weight_only_for_blocks_it_cannot_smooth(monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from kdcode.compression.smooth import int8_scheme_for

    monkeypatch.setattr("kdcode.compression.smooth.cpu_has_int8_dot", lambda: True)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64))
    scheme, why = int8_scheme_for(model, "auto")
    assert scheme == "weight-only" and "gpt_neox blocks are not GPT-2 or Llama-style" in why


def test_the_cli_names_the_scheme_auto_chose(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    monkeypatch.setattr("kdcode.compression.smooth.cpu_has_int8_dot", lambda: False)
    r = runner.invoke(app, ["compress", str(teacher_dir), "--out", str(tmp_path / "q"), "--int8", "--data",
                            str(corpus_dir), "--check-samples", "0", "--check-blocks", "0"])
    assert r.exit_code == 0, r.output
    assert "int8 scheme: weight-only (auto: this CPU has no int8 dot products" in r.output


# ------------------------------------------------------------------------------------------- export
def test_onnx_int8_export_is_measured_in_onnxruntime(tmp_path, llama_dir, corpus_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kdcode.export.run import run_export
    from kdcode.spec_compress import ExportCheckSpec, ExportSpec

    check = ExportCheckSpec(data=DataSpec(source=str(corpus_dir)), check_samples=2, check_blocks=1)
    out, m = run_export(str(llama_dir), ExportSpec(format="onnx", int8=True), tmp_path / "onnx", check=check)
    q = json.loads((out / "kdcode.json").read_text())["quality"]
    assert q == m["quality"] and q["before"]["samples"] == q["after"]["samples"] == 2
    assert q["before"]["perplexity"] and q["after"]["perplexity"] and q["perplexity_change_pct"] is not None
    float_out, fm = run_export(str(llama_dir), ExportSpec(format="onnx"), tmp_path / "f32", check=check)
    assert "quality" not in fm  # a float export changes nothing worth measuring


def test_quantized_gguf_says_why_it_is_not_measured(tmp_path, teacher_dir, corpus_dir):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: the GGUF is measured")
    r = runner.invoke(app, ["export", str(teacher_dir), "--out", str(tmp_path / "t.gguf"), "--format", "gguf",
                            "--quant", "q8_0", "--data", str(corpus_dir), "--check-samples", "2"])
    assert r.exit_code == 0, r.output
    assert "quality not measured: llama-cpp-python is not installed" in r.output
    sidecar = json.loads((tmp_path / "t.kdcode.json").read_text())
    assert sidecar["quality"]["skipped"].startswith("llama-cpp-python is not installed")
