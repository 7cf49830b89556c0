"""The CLI end to end on a tiny model: distil -> eval -> bench, and its error behaviour."""

from __future__ import annotations

import json
import re

import pytest
import typer
import yaml
from conftest import run
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdcode import __version__
from kdcode.cli import app

COMMANDS = ["distil", "pretrain", "plan", "cache-teacher", "eval", "bench", "sweep", "report", "complete", "serve",
            "list", "doctor", "compress", "export", "data"]


def test_version_and_help():
    r = run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"kdcode {__version__}"
    root = typer.main.get_command(app)
    assert list(root.commands) == COMMANDS  # the documented set, in the order help lists them
    r = run("-h")
    assert r.exit_code == 0, r.output
    listed = re.findall(r"^│ ([a-z][a-z-]*)\s{2,}\S", r.output, re.M)  # the Commands panel, one name per row
    assert listed == COMMANDS, r.output
    assert all(opt in r.output for opt in ("--version", "--debug", "--help")), r.output
    for cmd in ("distil", "eval", "bench", "pretrain", "list"):
        r = run(cmd, "-h")
        assert r.exit_code == 0 and f"Usage: kdcode {cmd} [OPTIONS]" in r.output, r.output
        options = [p.opts[0] for p in root.commands[cmd].params if p.opts[0].startswith("--") and not p.hidden]
        assert options and [o for o in options if not re.search(rf"{o}(?![\w-])", r.output)] == [], (cmd, r.output)


def test_print_spec_resolves_file_and_flags(tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text("student:\n  layers: 4\nstrategy:\n  name: in-training\ntrain:\n  lr: 0.001\n")
    r = run("distil", "--spec", spec, "--layers", "3", "--temperature", "1.5", "--print-spec")
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(r.output)
    assert resolved["student"]["layers"] == 3  # flag beats file
    assert resolved["strategy"] == {"name": "in-training", "params": {"temperature": 1.5}}
    assert resolved["train"]["lr"] == 0.001
    assert resolved["train"]["max_steps"] == 800  # default budget
    assert resolved["teacher"]["name"] == "bundled"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategy", "pretrainig", "--validate"], "Did you mean 'pretraining'"),
        (["--init", "sprad", "--validate"], "Did you mean 'spread'"),
        (["--temperature", "0", "--validate"], "temperature"),
        (["--layers", "0", "--print-spec"], "student.layers"),
        (["--max-steps", "-5", "--print-spec"], "train.max_steps"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle):
    r = run("distil", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_distil_eval_bench_end_to_end(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "student"
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--layers", "2", "--max-steps", "3",
            "--batch-size", "2", "--block-size", "64", "--precision", "fp32", "--out", out)
    assert r.exit_code == 0, r.output
    assert f"kdcode eval {out}" in r.output
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "kdcode.json",
            "README.md", "train_log.jsonl"} <= names
    assert not any(n.endswith(".bin") for n in names)
    manifest = json.loads((out / "kdcode.json").read_text())
    assert manifest["layer_map"] == [0, 3]
    assert manifest["training"]["steps"] == 3 and manifest["training"]["tokens_seen"] == 3 * 2 * 64
    assert manifest["teacher"]["n_layer"] == 4 and manifest["teacher"]["verified"] is None
    assert manifest["data"]["files"] == {"train": 24, "valid": 3, "test": 4}
    assert manifest["spec"]["student"]["layers"] == 2
    assert {"reverse_kl", "hard", "loss"} <= set(manifest["training"]["final"])  # the default strategy's terms
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2

    # refuse to overwrite
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", out, "--max-steps", "1")
    assert r.exit_code == 2 and "--overwrite" in r.output

    metrics = tmp_path / "eval.json"
    r = run("eval", out, "--data", corpus_dir, "--samples", "6", "--max-new-tokens", "8", "--ppl-blocks", "2",
            "--json", metrics, "--record")
    assert r.exit_code == 0, r.output
    m = json.loads(metrics.read_text())
    assert {"es", "em", "perplexity", "samples"} <= m.keys()
    assert m["samples"] == 6 and 0 <= m["es"] <= 100 and m["perplexity"] > 1
    assert m["baseline"]["samples"] == 6
    assert json.loads((out / "kdcode.json").read_text())["metrics"]["eval"]["es"] == m["es"]

    bench_json = tmp_path / "bench.json"
    r = run("bench", out, "--compare", teacher_dir, "--data", corpus_dir, "--prompts", "3", "--new-tokens", "4",
            "--threads", "1", "--json", bench_json)
    assert r.exit_code == 0, r.output
    b = json.loads(bench_json.read_text())
    keys = {"params_m", "size_mb", "peak_memory_mb", "samples_per_s", "ms_per_token_p50", "ms_per_token_p95",
            "device", "dtype", "threads"}
    assert keys <= b.keys() and keys <= b["compare"].keys()
    assert b["threads"] == 1 and b["dtype"] == "float32" and b["device"] == "cpu"
    assert b["params_m"] < b["compare"]["params_m"]
    assert b["size_mb"] < b["compare"]["size_mb"]


def test_a_third_party_warning_is_shown_once_after_the_command(tmp_path):
    # re-showing a caught warning while still recording them appended it to the list being read, forever
    import warnings

    import typer

    from kdcode.cli._common import handle_errors

    demo = typer.Typer()

    @demo.command()
    @handle_errors
    def hello() -> None:
        warnings.warn("an old name is deprecated", FutureWarning, stacklevel=1)
        typer.echo("done")

    with pytest.warns(FutureWarning, match="an old name is deprecated") as shown:
        r = CliRunner().invoke(demo, [])
    assert r.exit_code == 0, r.output
    assert "done" in r.output and len(shown) == 1
