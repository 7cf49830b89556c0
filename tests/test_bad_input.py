"""Bad input and faults, through the CLI: a non-zero exit, one clear line naming the field or file and
what to do, no traceback (``--debug`` shows it); nothing half-written; nothing unsafe loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_gpt2, run

from kdcode import __version__
from kdcode.errors import KdcodeError
from kdcode.models.artifacts import MANIFEST, verify

FAST = ["--layers", "2", "--max-steps", "2", "--batch-size", "2", "--block-size", "32", "--precision", "fp32"]
UNKNOWN = "unknown key (not a field of this section)"
EVAL_FAST = ["--samples", "2", "--max-new-tokens", "2", "--ppl-blocks", "0"]


def one_clear_line(r, phrase: str, code: int = 2) -> str:
    """The run failed with ``code``, printed one ``error:`` line holding ``phrase``, and no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.output
    assert phrase in errors[0], errors[0]
    print(errors[0])  # shown with pytest -s: the message catalogue
    return errors[0]


# ------------------------------------------------------------------------------ spec and plugins
@pytest.mark.parametrize(
    ("spec_text", "phrase"),
    [
        ("student:\n  layres: 4\n", f"student.layres: {UNKNOWN}, did you mean 'layers'?"),
        ("teachr:\n  name: bundled\n", f"teachr: {UNKNOWN}, did you mean 'teacher'"),
        ("train:\n  max_step: 3\n", f"train.max_step: {UNKNOWN}, did you mean 'max_steps'"),
        ("student:\n  layers: six\n", "student.layers: Input should be a valid integer"),
        ("train:\n  precision: int8\n", "train.precision: Input should be 'auto', 'fp32'"),
        ("strategy:\n  params: {temprature: 2}\n", f"temprature: {UNKNOWN}, did you mean 'temperature'"),
        (
            "strategy:\n  name: pretraining\n  params: {alpha_soft: 0, alpha_hard: 0, alpha_cos: 0}\n",
            "alpha_soft, alpha_hard and alpha_cos are all zero",
        ),
        ("strategy:\n  params: {alpha_soft: 0, alpha_hard: 0}\n", "alpha_soft and alpha_hard are both zero"),
        ("strategy:\n  params: {alpha_sofft: 0.5}\n", f"alpha_sofft: {UNKNOWN}, did you mean 'alpha_soft'"),
        # an old weight name of another strategy is no name of this one (reverse-kl's was alpha_kd)
        ("strategy:\n  params: {alpha_ce: 0.5}\n", f"alpha_ce: {UNKNOWN}"),
        ("- just\n- a list\n", "must hold a mapping of sections"),
        ("student: [unclosed\n", "is not valid YAML/JSON"),
    ],
)
def test_bad_spec_file(tmp_path, spec_text, phrase):
    spec = tmp_path / "run.yaml"
    spec.write_text(spec_text)
    line = one_clear_line(run("distil", "--spec", spec, "--validate"), phrase)
    assert str(spec) in line or "strategy" in line  # names the file (or the plugin section)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--strategy", "pretrainig"], "unknown strategy 'pretrainig'. Did you mean 'pretraining'"),
        (["--init", "sprad"], "unknown init 'sprad'. Did you mean 'spread'"),
        (["--layers", "0"], "student.layers: Input should be greater than or equal to 1"),
        (["--temperature", "0"], "temperature: Input should be greater than 0"),
        (["--temperature", "-1"], "temperature: Input should be greater than 0"),
        (["--max-steps", "-5"], "train.max_steps: Input should be greater than or equal to 1"),
        (["--max-minutes", "0"], "train.max_minutes: Input should be greater than 0"),
        (["--lr", "-0.1"], "train.lr: Input should be greater than 0"),
        (["--batch-size", "0"], "train.batch_size: Input should be greater than or equal to 1"),
        (["--block-size", "4"], "train.block_size: Input should be greater than or equal to 8"),
        (["--precision", "int8"], "train.precision: Input should be 'auto', 'fp32'"),
    ],
)
def test_bad_flags(args, phrase):
    one_clear_line(run("distil", *args, "--validate"), phrase)


def test_missing_spec_file(tmp_path):
    one_clear_line(run("distil", "--spec", tmp_path / "nope.yaml"), "nope.yaml does not exist")


def test_debug_shows_the_traceback():
    plain = run("distil", "--layers", "0", "--print-spec")
    assert plain.exit_code == 2 and isinstance(plain.exception, SystemExit)
    debug = run("--debug", "distil", "--layers", "0", "--print-spec")
    assert debug.exit_code == 1
    assert isinstance(debug.exception, KdcodeError) and "student.layers" in str(debug.exception)
    # and the flag does not leak into the next invocation
    assert isinstance(run("distil", "--layers", "0", "--print-spec").exception, SystemExit)


# ----------------------------------------------------------------------------------------- teacher
def test_missing_teacher_offline(tmp_path, corpus_dir):
    r = run("distil", "--teacher", "nobody/no-such-model", "--data", corpus_dir, "--out", tmp_path / "s", *FAST)
    one_clear_line(r, "the model 'nobody/no-such-model' is not in the Hugging Face cache")
    assert "pass a local folder" in r.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "no_config"])
def test_teacher_path_problems(tmp_path, corpus_dir, kind):
    path = tmp_path / "t"
    if kind == "file":
        path.write_text("x")
    elif kind == "no_config":
        path.mkdir()
    phrase = {
        "missing": f"model folder {path} does not exist; check the path",
        "file": "is a file; a model is a folder with config.json and weights",
        "no_config": "has no config.json; it is not a Hugging Face model folder",
    }[kind]
    one_clear_line(run("distil", "--teacher", path, "--data", corpus_dir, "--out", tmp_path / "s", *FAST), phrase)


def test_layers_deeper_than_the_teacher(tmp_path, teacher_dir, corpus_dir):
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", tmp_path / "s", *FAST, "--layers", "9")
    one_clear_line(r, "student.layers=9 is outside 1..4 (the depth of teacher")
    assert not (tmp_path / "s").exists()


def test_block_size_above_the_teachers_positions(tmp_path, teacher_dir, corpus_dir):
    r = run(
        "distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", tmp_path / "s", *FAST, "--block-size", "512"
    )
    one_clear_line(r, "--block-size 512 exceeds the teacher's 128 positions; use --block-size 128")


def test_batch_that_cannot_fit_fails_before_training(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    import kdcode.train.resources

    monkeypatch.setattr(kdcode.train.resources, "available_memory", lambda device: 2**20)  # 1 MiB free
    r = run(
        "distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", tmp_path / "s", *FAST, "--batch-size", "64"
    )
    line = one_clear_line(r, "(batch 64 x block 32, 2 layers of width 32, vocab 512), but only 1.0 MiB is free on cpu")
    assert "use --batch-size" in line and "--block-size" in line
    assert not (tmp_path / "s").exists()


def test_pretrain_batch_that_cannot_fit(tmp_path, corpus_dir, monkeypatch):
    import kdcode.train.resources

    monkeypatch.setattr(kdcode.train.resources, "available_memory", lambda device: 2**20)
    r = run(
        "pretrain",
        "--data",
        corpus_dir,
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--vocab-size",
        "512",
        "--block-size",
        "64",
        "--batch-size",
        "4096",
        "--max-steps",
        "1",
        "--out",
        tmp_path / "p",
    )
    one_clear_line(r, "(batch 4096 x block 64, 2 layers of width 32, vocab 512)")


# -------------------------------------------------------------------------------------------- data
def _bad_corpus(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    if kind == "no_match":
        (d / "notes.txt").write_text("not python")
    elif kind == "unusable":
        (d / "empty.py").write_text("  \n")
        (d / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    return d


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("no_match", "no usable files matching '**/*.py' under"),
        ("unusable", "(skipped: 1 empty, 1 not UTF-8 text); check --data or set the glob"),
    ],
)
def test_data_folder_without_usable_files(tmp_path, teacher_dir, kind, phrase):
    data = _bad_corpus(tmp_path, kind)
    r = run("distil", "--teacher", teacher_dir, "--data", data, "--out", tmp_path / "s", *FAST)
    line = one_clear_line(r, phrase)
    assert f"no usable files matching '**/*.py' under {data}" in line


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("missing", "does not exist; pass a folder, a .jsonl file or a dataset id"),
        ("empty_file", "cannot be used: 1 empty"),
        ("latin1_file", "cannot be used: 1 not UTF-8 text"),
        ("jsonl_no_field", "holds no records with a text field 'code'; set data.field"),
        ("tiny", "fewer than one block of 32; add files or lower --block-size"),
    ],
)
def test_bad_data_paths(tmp_path, teacher_dir, kind, phrase):
    path = tmp_path / {"jsonl_no_field": "d.jsonl"}.get(kind, "d.py")
    if kind == "missing":
        path = tmp_path / "nope" / "d.py"
    elif kind == "empty_file":
        path.write_text("")
    elif kind == "latin1_file":
        path.write_bytes(b"x = '\xe9'\n")
    elif kind == "jsonl_no_field":
        path.write_text('{"text": "x = 1"}\n')
    elif kind == "tiny":
        path.write_text("x = 1\n")
    one_clear_line(run("distil", "--teacher", teacher_dir, "--data", path, "--out", tmp_path / "s", *FAST), phrase)


@pytest.mark.slow
def test_skipped_files_are_counted_and_printed_an_enormous_line_too(tmp_path, teacher_dir, corpus_dir):
    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    (data / "empty.py").write_text("\n\n")
    (data / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (data / "huge.py").write_text("x = [" + "1, " * 300_000 + "]\n")  # one 900 kB line: data, not code
    out = tmp_path / "s"
    r = run("distil", "--teacher", teacher_dir, "--data", data, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["data"]["skipped"] == {"empty": 1, "non_utf8": 1, "over_max_line_chars": 1}
    assert "skipped: 1 empty, 1 not UTF-8 text, 1 with a line over 20000 characters" in r.output
    assert sum(manifest["data"]["files"].values()) == 24 + 3 + 4
    assert verify(out) is True


# ------------------------------------------------------------------------------------------- --out
def test_out_not_empty_is_refused_before_any_work(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run("distil", "--teacher", "nobody/not-loaded", "--data", corpus_dir, "--out", out, *FAST)
    one_clear_line(r, f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_out_is_a_file(tmp_path, corpus_dir):
    out = tmp_path / "s"
    out.write_text("x")
    r = run("distil", "--data", corpus_dir, "--out", out, *FAST)
    one_clear_line(r, f"--out {out} exists and is not a folder; choose another path")


def test_overwrite_replaces_the_folder(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "s"
    out.mkdir()
    (out / "old.txt").write_text("old")
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", out, *FAST, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "old.txt").exists() and verify(out) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ---------------------------------------------------------------------------------- model folders
def test_edited_weights_refused_unless_no_verify(student, corpus_dir):
    with (student / "model.safetensors").open("r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    r = run("eval", student, "--data", corpus_dir, *EVAL_FAST)
    one_clear_line(
        r,
        "does not match the sha256 in kdcode.json (edited or corrupted); re-create it, or pass "
        "--no-verify to load it anyway",
    )
    r = run("eval", student, "--data", corpus_dir, *EVAL_FAST, "--no-verify")
    assert r.exit_code == 0, r.output


def test_missing_weight_file_refused(student, corpus_dir):
    (student / "model.safetensors").unlink()
    r = run("eval", student, "--data", corpus_dir, *EVAL_FAST)
    one_clear_line(r, "has no weight files (*.safetensors); the folder is incomplete: re-create it")


def test_missing_one_of_several_weight_files_refused(student, corpus_dir):
    m = json.loads((student / MANIFEST).read_text())
    m["weights_sha256"]["model-00002-of-00002.safetensors"] = "0" * 64
    (student / MANIFEST).write_text(json.dumps(m))
    one_clear_line(
        run("eval", student, "--data", corpus_dir, *EVAL_FAST),
        "model-00002-of-00002.safetensors is missing (listed in kdcode.json); the folder is incomplete",
    )


def test_unlisted_weight_file_refused(student, corpus_dir):
    shutil.copy(student / "model.safetensors", student / "extra.safetensors")
    one_clear_line(
        run("eval", student, "--data", corpus_dir, *EVAL_FAST),
        "holds weight files not listed in kdcode.json: extra.safetensors; remove them or pass --no-verify",
    )


def test_damaged_manifest_refused(student, corpus_dir):
    (student / MANIFEST).write_text("{not json")
    one_clear_line(run("eval", student, "--data", corpus_dir, *EVAL_FAST), "kdcode.json is not valid JSON")


def _onnx_like(folder: Path, teacher_dir: Path) -> Path:
    """What the onnxruntime backend finds before it runs a graph: model.onnx, an export manifest, config, tokenizer."""
    shutil.copytree(teacher_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "model.onnx").write_bytes(b"not run: refused before")
    (folder / MANIFEST).write_text(json.dumps({"kind": "export", "format": "onnx"}))
    return folder


def test_a_damaged_config_is_the_same_one_line_in_an_onnx_folder_as_in_a_torch_one(tmp_path, teacher_dir):
    pytest.importorskip("onnxruntime")
    plain = tmp_path / "torch"
    shutil.copytree(teacher_dir, plain)
    onnx = _onnx_like(tmp_path / "onnx", teacher_dir)
    for folder in (plain, onnx):
        (folder / "config.json").write_text("{not json")
        r = run("complete", str(folder), "--device", "cpu", input="x = ")
        line = one_clear_line(r, f"cannot load the model in {folder}: ")
        assert line.endswith("(the folder is damaged or incomplete; re-create it)"), line


@pytest.mark.parametrize("flags", [["--kv-cache", "static"], ["--compile"], ["--kv-cache", "static", "--compile"]])
def test_torch_decode_flags_on_an_onnx_folder_are_refused(tmp_path, teacher_dir, flags):
    onnx = _onnx_like(tmp_path / "onnx", teacher_dir)
    what = " and ".join(f for f in ("--kv-cache static", "--compile") if f.split()[0] in flags)
    for cmd in (["complete", str(onnx)], ["serve", str(onnx)], ["eval", str(onnx), *EVAL_FAST],
                ["bench", str(onnx), "--rounds", "1", "--prompts", "1"]):
        r = run(*cmd, "--device", "cpu", *flags, input="x = ")
        one_clear_line(r, f"{what} {'are' if ' and ' in what else 'is'} for the torch backend; {onnx} runs in "
                          "onnxruntime")


def test_newer_manifest_refused(student, corpus_dir):
    m = json.loads((student / MANIFEST).read_text())
    m["kdcode_version"] = "99.0.0"
    (student / MANIFEST).write_text(json.dumps(m))
    one_clear_line(
        run("eval", student, "--data", corpus_dir, *EVAL_FAST),
        f"was made by kdcode 99.0.0, newer than this kdcode {__version__}; upgrade kdcode",
    )


def test_plain_hf_folder_accepted_as_unverified(teacher_dir, corpus_dir):
    r = run("eval", teacher_dir, "--data", corpus_dir, *EVAL_FAST)
    assert r.exit_code == 0, r.output
    assert "no kdcode.json manifest: weights unverified" in r.output


def test_record_on_a_plain_hf_folder_is_refused(teacher_dir, corpus_dir):
    r = run("eval", teacher_dir, "--data", corpus_dir, *EVAL_FAST, "--record")
    one_clear_line(r, "has no kdcode.json; --record needs a kdcode model folder")


@pytest.fixture()
def pickled(tmp_path, teacher_dir) -> Path:
    """A folder holding only pickle weights (pytorch_model.bin)."""
    d = tmp_path / "pickled"
    shutil.copytree(teacher_dir, d)
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


@pytest.mark.slow
def test_pickle_only_folder_refused_unless_allow_pickle(pickled, tmp_path, corpus_dir):
    phrase = (
        "holds only pickle weights (pytorch_model.bin), which can run code when loaded; convert them to "
        "safetensors, or pass --allow-pickle if you trust the source"
    )
    one_clear_line(run("eval", pickled, "--data", corpus_dir, *EVAL_FAST), phrase)
    one_clear_line(run("bench", pickled, "--data", corpus_dir, "--prompts", "1"), phrase)
    one_clear_line(run("distil", "--teacher", pickled, "--data", corpus_dir, "--out", tmp_path / "s", *FAST), phrase)
    r = run("eval", pickled, "--data", corpus_dir, *EVAL_FAST, "--allow-pickle")
    assert r.exit_code == 0, r.output


def test_allow_pickle_in_a_spec_file(tmp_path, pickled):
    spec = tmp_path / "run.yaml"
    spec.write_text(f"teacher:\n  name: {pickled}\n  allow_pickle: true\n")
    r = run("distil", "--spec", spec, "--print-spec")
    assert r.exit_code == 0 and "allow_pickle: true" in r.output


@pytest.fixture()
def remote_code(tmp_path, teacher_dir) -> tuple[Path, Path]:
    """A model folder whose config asks for its own Python code, which would leave a marker file if run."""
    d = tmp_path / "remote"
    shutil.copytree(teacher_dir, d)
    marker = tmp_path / "EXECUTED"
    (d / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2LMHeadModel\n\n\nclass EvilModel(GPT2LMHeadModel):\n    pass\n"
    )
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    return d, marker


def test_remote_code_never_runs_without_the_flag(remote_code, tmp_path, corpus_dir):
    folder, marker = remote_code
    run("eval", folder, "--data", corpus_dir, *EVAL_FAST)
    run("distil", "--teacher", folder, "--data", corpus_dir, "--out", tmp_path / "s", *FAST, "--block-size", "512")
    assert not marker.exists()


def test_trust_remote_code_flags_reach_the_loader(monkeypatch, tmp_path, corpus_dir, teacher_dir):
    import kdcode.evaluation.bench
    import kdcode.inference.loader
    import kdcode.train.distil

    seen: list[dict] = []

    def fake_load_model(name, **kwargs):
        seen.append(kwargs)
        raise KdcodeError("stop here")

    def fake_run_bench(name, spec, **kwargs):
        seen.append(kwargs)
        raise KdcodeError("stop here")

    monkeypatch.setattr(kdcode.train.distil, "load_model", fake_load_model)  # where distil and eval call it
    monkeypatch.setattr(kdcode.inference.loader, "load_model", fake_load_model)
    monkeypatch.setattr(kdcode.evaluation.bench, "run_bench", fake_run_bench)
    for flags in ([], ["--trust-remote-code", "--allow-pickle"]):
        seen.clear()
        run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--layers", "2", "--out", tmp_path / "s", *flags)
        run("eval", teacher_dir, *flags)
        run("bench", teacher_dir, *flags)
        assert len(seen) == 3
        for kwargs in seen:
            assert kwargs["trust_remote_code"] is bool(flags) and kwargs["allow_pickle"] is bool(flags)


# ---------------------------------------------------------------------------------------- vocab
def test_teacher_and_student_with_different_vocab_refused(tokenizer, corpus_dir):
    from kdcode.data.bpe import train_bpe
    from kdcode.models.load import check_same_vocab

    other = train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:3]], vocab_size=300)
    with pytest.raises(KdcodeError, match="use different tokenizers .* KD needs one vocabulary"):
        check_same_vocab(tokenizer, other, "student")
    check_same_vocab(tokenizer, tokenizer, "student")  # same vocab: fine


def test_pretrained_student_with_another_vocab_refused(tmp_path, teacher_dir, corpus_dir):
    from kdcode.data.bpe import train_bpe

    other_tok = train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:3]], vocab_size=300)
    other = tmp_path / "other"
    make_gpt2(other_tok, n_layer=2).save_pretrained(other)
    other_tok.save_pretrained(other)
    spec = tmp_path / "run.yaml"
    spec.write_text(f"student:\n  init: {{name: pretrained, params: {{path: {other}}}}}\n")
    r = run("distil", "--spec", spec, "--teacher", teacher_dir, "--data", corpus_dir, "--out", tmp_path / "s", *FAST)
    one_clear_line(r, f"checkpoint {other} and the teacher use different tokenizers (vocab 300 vs 512)")
    assert not (tmp_path / "s").exists()


def test_teacher_cache_with_another_tokenizer_refused(tmp_path):
    from kdcode.train.teacher_cache import check_cache

    cache = SimpleNamespace(manifest={"tokenizer_hash": "a" * 64, "block_size": 32})
    with pytest.raises(KdcodeError, match="was made for another tokenizer .* rebuild it"):
        check_cache(cache, {"tokenizer_hash": "b" * 64, "block_size": 32}, tmp_path)
