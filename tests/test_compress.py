"""`kdcode compress`: int8 round trip and logits, pruning equals masking, the manifest chain, loading."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, run
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from kdcode.compression.compress import run_compress
from kdcode.compression.int8 import INT8_FILE, Int8Linear, dequantize_int8, quantize_int8, quantize_model
from kdcode.compression.prune import keep_top, prune_ffn, prune_heads, unit_importance
from kdcode.errors import KdcodeError
from kdcode.inference.decode import _forward_kwargs, _out_cache
from kdcode.models.artifacts import sha256_file
from kdcode.models.load import load_model
from kdcode.spec import DataSpec
from kdcode.spec_compress import CompressSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def ids(vocab: int, n: int = 3, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def no_pickle(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]


def spec(corpus_dir: Path, **kw) -> CompressSpec:
    kw = {"check_samples": 0, "check_blocks": 0, **kw}  # the quality check has its own tests (test_int8_schemes)
    return CompressSpec(
        data=DataSpec(source=str(corpus_dir)), calib_batches=2, calib_batch_size=2, calib_block_size=32, **kw
    )


# ------------------------------------------------------------------------------------------- int8
@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (3, 1)])
def test_int8_round_trip_is_within_half_a_step(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, shape[0])[:, None]
    w[0] = 0.0  # an all-zero row
    w[-1, 0] = 50.0  # an outlier sets its row's scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize_int8(q, scale)).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6 * w.abs()).all())
    assert bool((dequantize_int8(q, scale)[0] == 0).all())


def test_int8_linear_matches_its_dequantized_weights():
    lin = torch.nn.Linear(48, 40)
    q8 = Int8Linear.from_float(lin)
    q, scale, bias = q8.unpacked()
    want_q, want_scale = quantize_int8(lin.weight)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    x = torch.randn(2, 5, 48)
    ref = x @ dequantize_int8(q, scale).T + bias
    # the only other error: activations quantized to 7 bits per tensor at run time
    assert (q8(x) - ref).abs().max() < 0.02 * ref.abs().max()


def test_int8_model_logits_close_to_fp32(tokenizer):
    model = make_gpt2(tokenizer, n_embd=64, n_head=4)
    q8 = copy.deepcopy(model)
    layout = quantize_model(q8)
    assert layout["tied"] == {"embedding": "transformer.wte", "head": "lm_head"}
    assert len(layout["modules"]) == 4 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    x = ids(len(tokenizer))
    with torch.no_grad():
        a, b = model(x).logits, q8(x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


# ---------------------------------------------------------------------------------------- pruning
def masked(model, heads_keep=None, ffn_keep=None):
    """The original model with the pruned units' outputs zeroed (their c_proj rows)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for i, b in enumerate(m.transformer.h):
            if heads_keep is not None:
                hd = b.attn.head_dim
                for h in set(range(b.attn.num_heads)) - set(heads_keep[i]):
                    b.attn.c_proj.weight[h * hd : (h + 1) * hd] = 0
            if ffn_keep is not None:
                drop = sorted(set(range(b.mlp.c_fc.nf)) - set(ffn_keep[i]))
                b.mlp.c_proj.weight[drop] = 0
    return m


def test_pruning_equals_masking_and_keeps_the_cache_right(tokenizer):
    model = make_gpt2(tokenizer, n_embd=32, n_head=4)
    heads_keep = [[0, 2, 3], [1, 2, 3], [0, 1, 3], [0, 1, 2]]
    ffn_keep = [sorted(torch.randperm(128, generator=torch.Generator().manual_seed(i))[:96].tolist()) for i in range(4)]
    pruned = copy.deepcopy(model)
    prune_heads(pruned, heads_keep)
    prune_ffn(pruned, ffn_keep)
    assert pruned.config.n_inner == 96 and [b.attn.num_heads for b in pruned.transformer.h] == [3] * 4
    x = ids(len(tokenizer))
    with torch.no_grad():
        want = masked(model, heads_keep, ffn_keep)(x).logits
        got = pruned(x).logits
        assert torch.allclose(got, want, atol=1e-5)
        first = pruned(x[:, :-1], use_cache=True)
        cache_kw = _forward_kwargs(pruned)[0]
        last = pruned(x[:, -1:], **{cache_kw: _out_cache(first)}, use_cache=True).logits[:, -1]
    assert torch.allclose(last, want[:, -1], atol=1e-5)


def test_importance_of_a_dead_unit_is_zero_and_it_goes_first(tokenizer):
    model = make_gpt2(tokenizer, n_embd=32, n_head=4)
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[8:16] = 0  # head 1 of layer 0 contributes nothing
        model.transformer.h[1].mlp.c_proj.weight[5] = 0  # neuron 5 of layer 1 neither
    scores = unit_importance(model, ids(len(tokenizer), n=4, t=32), batch_size=2)
    assert scores["heads"][0][1] == 0 and bool((scores["heads"][0][[0, 2, 3]] > 0).all())
    assert scores["ffn"][1][5] == 0 and int((scores["ffn"][1] > 0).sum()) == 127
    assert keep_top(scores["heads"][0], 0.25, "heads") == [0, 2, 3]
    assert 5 not in keep_top(scores["ffn"][1], 0.1, "MLP neurons")
    assert not any(p.grad is not None for p in model.parameters())
    with pytest.raises(KdcodeError, match="removes none"):
        keep_top(scores["heads"][0], 0.1, "heads")


# ----------------------------------------------------------------------------------------- folders
def test_prune_and_int8_folder_chain_and_loading(tmp_path, teacher_dir, corpus_dir):
    teacher = load_model(str(teacher_dir))
    pruned_dir, m = run_compress(
        str(teacher_dir), spec(corpus_dir, prune_heads=0.5, prune_ffn=0.25), tmp_path / "pruned"
    )
    comp = m["compression"]
    assert [s["step"] for s in comp["steps"]] == ["prune-heads", "prune-ffn"]
    assert comp["parent"]["weights_sha256"] == {"model.safetensors": sha256_file(teacher_dir / "model.safetensors")}
    assert comp["parent"]["path"] == str(teacher_dir.resolve()) and comp["parent_manifest"] is None
    assert comp["layout"]["loader"] == "kdcode" and "kdcode.models.load_model" in comp["loading"]
    assert "Load it with kdcode" in (pruned_dir / "README.md").read_text()
    heads_keep, ffn_keep = comp["steps"][0]["kept"], comp["steps"][1]["kept"]
    assert [len(k) for k in heads_keep] == [1] * 4 and [len(k) for k in ffn_keep] == [96] * 4
    with pytest.raises(RuntimeError):  # plain transformers refuses the head-pruned shapes loudly
        AutoModelForCausalLM.from_pretrained(pruned_dir)

    pruned = load_model(str(pruned_dir))
    assert pruned.verified is True and pruned.params < teacher.params
    x = ids(pruned.model.config.vocab_size)
    with torch.no_grad():
        want = masked(teacher.model, heads_keep, ffn_keep)(x).logits
        assert torch.allclose(pruned.model(x).logits, want, atol=1e-5)

    # prune, then quantize: the chain goes one level deeper
    q_dir, qm = run_compress(str(pruned_dir), spec(corpus_dir, int8=True), tmp_path / "pruned-int8")
    assert [p.name for p in q_dir.glob("*.safetensors")] == [INT8_FILE]
    assert qm["compression"]["parent"]["weights_sha256"] == {
        "model.safetensors": sha256_file(pruned_dir / "model.safetensors")
    }
    assert qm["compression"]["parent_manifest"]["compression"]["steps"] == comp["steps"]
    assert qm["compression"]["layout"]["heads_per_layer"] == [1] * 4
    no_pickle(q_dir)
    q = load_model(str(q_dir))
    assert q.verified is True and abs(q.params - pruned.params) < 0.01 * pruned.params
    with torch.no_grad():
        got = q.model(x).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(KdcodeError, match="already int8"):
        run_compress(str(q_dir), spec(corpus_dir, int8=True), tmp_path / "again")


def test_int8_folder_layout_size_eval_and_bench(tmp_path, teacher_dir, corpus_dir):
    from kdcode.evaluation.bench import run_bench
    from kdcode.evaluation.evaluate import run_eval
    from kdcode.spec import BenchSpec, EvalSpec

    out, m = run_compress(str(teacher_dir), spec(corpus_dir, int8=True), tmp_path / "int8")
    no_pickle(out)
    with safe_open(str(out / INT8_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight_int8").dtype == torch.int8
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight_int8").shape == (96, 32)  # (out, in)
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight_scale").dtype == torch.float32
    assert "transformer.wte.weight_int8" in keys and not any(k.startswith("lm_head") for k in keys)
    assert not any(k.endswith(".weight") and ".c_" in k for k in keys)
    fp32 = (teacher_dir / "model.safetensors").stat().st_size
    assert (out / INT8_FILE).stat().st_size < 0.4 * fp32  # tiny model: biases/norms/positions weigh more
    layout = json.loads((out / "kdcode.json").read_text())["compression"]["layout"]["int8"]
    assert layout["file"] == INT8_FILE and "per output channel" in layout["scheme"]

    data = DataSpec(source=str(corpus_dir))
    r = run_eval(str(out), EvalSpec(data=data, samples=4, max_new_tokens=4, ppl_blocks=1))
    assert r["verified"] is True and r["es"] is not None and r["perplexity"] is not None
    b = run_bench(
        str(out),
        BenchSpec(data=data, prompts=2, warmup=1, new_tokens=3, threads=1, device="cpu"),
        compare=str(teacher_dir),
        isolate=False,
    )
    assert b["dtype"].startswith("int8") and b["size_mb"] < 0.4 * b["compare"]["size_mb"]
    assert b["weights_memory_mb"] < 0.5 * b["compare"]["weights_memory_mb"]
    assert b["params_m"] == b["compare"]["params_m"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_folders_load_with_plain_transformers(tmp_path, teacher_dir, corpus_dir, dtype):
    out, m = run_compress(str(teacher_dir), spec(corpus_dir, dtype=dtype), tmp_path / dtype)
    no_pickle(out)
    assert m["compression"]["layout"]["loader"] == "transformers"
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert next(model.parameters()).dtype == want
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, ref.transformer.h[0].attn.c_attn.weight.to(want))
    assert (out / "model.safetensors").stat().st_size < 0.55 * (teacher_dir / "model.safetensors").stat().st_size


def test_ffn_only_pruned_folder_loads_with_plain_transformers(tmp_path, teacher_dir, corpus_dir):
    out, m = run_compress(str(teacher_dir), spec(corpus_dir, prune_ffn=0.5), tmp_path / "ffn")
    assert m["compression"]["layout"]["loader"] == "transformers"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_inner == 64 and model.transformer.h[0].mlp.c_fc.nf == 64


def test_cli_compress_and_its_errors(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "c"
    r = run("compress", teacher_dir, "--out", out, "--int8", "--prune-heads", 0.5, "--data", corpus_dir,
            "--calib-batches", 1, "--calib-batch-size", 2, "--calib-block-size", 32, "--check-samples", 2,
            "--check-blocks", 1)
    assert r.exit_code == 0, r.output
    assert "(prune-heads, " in r.output and "int8 scheme: " in r.output and (out / INT8_FILE).is_file()
    assert "quality: ES " in r.output and " -> " in r.output  # before -> after, measured before success
    for args, needle in [
        ([], "nothing to do"),
        (["--int8", "--dtype", "fp16"], "drop --dtype fp16"),
        (["--prune-heads", "1.5"], "--prune-heads: Input should be less than 1"),
        (["--prune-heads", "0.25"], "removes none"),  # 2 heads per layer
        (["--dtype", "fp8"], "dtype"),
    ]:
        r = run("compress", str(teacher_dir), "--out", str(tmp_path / "x"), *args)
        assert r.exit_code == 2 and needle in r.output, r.output
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------- compress, then train
def _distil_spec(teacher: Path, corpus_dir: Path, out: Path, init: str = "spread", **init_params):
    from kdcode.spec import RunSpec

    return RunSpec.model_validate(
        {
            "teacher": {"name": str(teacher)},
            "student": {"layers": 2, "init": {"name": init, "params": init_params}},
            "data": {"source": str(corpus_dir)},
            "train": {"max_steps": 2, "batch_size": 2, "block_size": 32, "precision": "fp32"},
            "out": str(out),
        }
    )


@pytest.mark.slow
def test_head_pruned_student_distils_on_and_reloads_with_its_heads(tmp_path, teacher_dir, corpus_dir):
    """Prune, then recover with KD from the pruned student, then quantize: every folder reloads."""
    from kdcode.train.distil import run_distil

    teacher = load_model(str(teacher_dir))
    two = tmp_path / "two"
    run_distil(_distil_spec(teacher_dir, corpus_dir, two))
    pruned, _ = run_compress(str(two), spec(corpus_dir, prune_heads=0.5), tmp_path / "pruned")
    out, m = run_distil(_distil_spec(teacher_dir, corpus_dir, tmp_path / "recovered", "pretrained", path=str(pruned)))
    assert m["compression"]["layout"] == {"loader": "kdcode", "heads_per_layer": [1, 1], "int8": None}
    assert m["model"]["heads_per_layer"] == [1, 1] and m["compression"]["inherited_from"].startswith("init pretrained")
    back = load_model(str(out))
    assert back.verified is True and [b.attn.num_heads for b in back.model.transformer.h] == [1, 1]
    start = load_model(str(pruned)).model
    x = ids(teacher.model.config.vocab_size)
    with torch.no_grad():
        moved = (back.model(x).logits - start(x).logits).abs().max()
    assert 0 < moved < 10  # trained two steps from the pruned weights, not from scratch
    q, qm = run_compress(str(out), spec(corpus_dir, int8=True), tmp_path / "recovered-int8")
    assert qm["compression"]["layout"]["heads_per_layer"] == [1, 1] and load_model(str(q)).verified is True


@pytest.mark.slow
def test_int8_folders_are_not_trained_and_unfit_teachers_are_not_copied(tmp_path, teacher_dir, corpus_dir):
    from kdcode.train.distil import run_distil

    q, _ = run_compress(str(teacher_dir), spec(corpus_dir, int8=True), tmp_path / "int8")
    with pytest.raises(KdcodeError, match="is int8 .* cannot be trained; use its float parent"):
        run_distil(_distil_spec(teacher_dir, corpus_dir, tmp_path / "a", "pretrained", path=str(q)))
    # a layer-copy init cannot copy an int8 or head-pruned teacher's blocks; it says so instead of
    # leaving those weights random
    pruned, _ = run_compress(str(teacher_dir), spec(corpus_dir, prune_heads=0.5), tmp_path / "pruned")
    for teacher in (q, pruned):
        with pytest.raises(KdcodeError, match="cannot copy the teacher's .* distil from its float, unpruned parent"):
            run_distil(_distil_spec(teacher, corpus_dir, tmp_path / "b"))
        assert not (tmp_path / "b").exists()
    # a frozen int8 teacher still teaches a random-init student; the in-training strategy would train it
    run_distil(_distil_spec(q, corpus_dir, tmp_path / "c", "random"))
    s = _distil_spec(q, corpus_dir, tmp_path / "d", "random")
    s.strategy.name = "in-training"
    with pytest.raises(KdcodeError, match="in-training.* cannot be trained"):
        run_distil(s)


def test_unloadable_weights_are_one_line_not_a_traceback(tmp_path, teacher_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_embd"] = 64  # the weights no longer fit the config
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run("eval", str(bad), "--no-verify")
    assert r.exit_code == 2 and f"cannot load the model in {bad}" in r.output, r.output
    assert "Traceback" not in r.output
