"""Local completion: cursor prefixes, the Engine (greedy, beams, sampling, streaming, healing) and `kdcode complete`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_gpt2, run

from kdcode.errors import KdcodeError
from kdcode.inference.decode import DecodeOptions, beam_hypotheses, encode_prompt, greedy
from kdcode.inference.engine import Engine, load_engine, prefix_at

SOURCE = "import os\n\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    return path\n"


@pytest.fixture(scope="module")
def engine(teacher_dir) -> Engine:
    return load_engine(str(teacher_dir), device="cpu")


def test_prefix_at_cursor():
    assert prefix_at(SOURCE, 5) == SOURCE[: SOURCE.index("path =")]  # after the indentation, kept
    assert prefix_at(SOURCE, 5, 1) == SOURCE[: SOURCE.index("    path =")]
    assert prefix_at(SOURCE, 5, 9) == SOURCE[: SOURCE.index(" = os")]
    assert prefix_at(SOURCE, 1, 10) == "import os"  # the end of the line
    assert prefix_at(SOURCE, 7) == SOURCE  # the empty line after the last newline
    assert prefix_at("a = 1\r\n    b", 2) == "a = 1\r\n    "
    for line, col in ((0, None), (8, None), (1, 11), (1, 0)):
        with pytest.raises(KdcodeError):
            prefix_at(SOURCE, line, col)


def test_greedy_is_the_eval_completer(engine, teacher_dir):
    """At a line start (no trailing whitespace), a completion is what `kdcode eval`'s decoding gives."""
    prompt = prefix_at(SOURCE, 5, 1)
    got = engine.complete(prompt, 12)
    assert [ch.text for ch in got.choices] == greedy(engine.model, engine.index, [prompt], DecodeOptions(12)).texts
    assert got.prompt_tokens == engine.count_tokens(prompt)
    assert got.choices[0].finish_reason in ("stop", "length") and got.first_token_s is not None


def test_healing_back_over_indentation_produces_it(engine):
    opts = DecodeOptions(max_new_tokens=6, heal_space=True, fixed_length=True)
    encoded = encode_prompt(engine.index, "def f():\n    ", opts, opts.context_for(engine.n_positions))
    prefix = encoded.healed
    assert prefix == "\n    " and engine.tokenizer.decode(list(encoded.ids)) == "def f():"
    gen = greedy(engine.model, engine.index, [encoded], opts, 1).token_ids[0]
    text = engine.tokenizer.decode(gen)
    assert text.startswith(prefix) or prefix.startswith(text)
    for hyp in beam_hypotheses(engine.model, engine.index, encoded, opts, 3):
        t = engine.tokenizer.decode(list(hyp.token_ids))
        assert t.startswith(prefix) or prefix.startswith(t)


def test_stream_deltas_add_up_to_the_text(engine):
    for kwargs in ({}, {"stop": ("):", "\n\n")}, {"temperature": 0.8, "seed": 3, "n": 3}):
        deltas: dict[int, str] = {}

        def on_text(i: int, d: str, deltas=deltas) -> None:
            deltas[i] = deltas.get(i, "") + d

        got = engine.complete(SOURCE[:40], 10, on_text=on_text, **kwargs)
        assert [deltas.get(i, "") for i in range(len(got.choices))] == [c.text for c in got.choices]


def test_sampling_is_seeded_and_stops_apply(engine):
    a = engine.complete(SOURCE[:30], 8, n=3, temperature=1.0, seed=1)
    b = engine.complete(SOURCE[:30], 8, n=3, temperature=1.0, seed=1)
    assert len(a.choices) == 3 and [c.text for c in a.choices] == [c.text for c in b.choices]
    free = engine.complete(SOURCE[:30], 5, stop=())
    assert free.choices[0].tokens <= 5
    if free.choices[0].finish_reason == "length":
        assert free.choices[0].tokens == 5
    with pytest.raises(KdcodeError):
        engine.complete("x", 4, beams=2, temperature=0.5)
    for bad in ({"seed": 2**64, "temperature": 1.0}, {"temperature": float("nan")}):
        with pytest.raises(KdcodeError):
            engine.complete("x", 4, **bad)


def test_cli_file_line_col_and_stdin(teacher_dir, tmp_path, engine):
    src = tmp_path / "foo.py"
    src.write_text(SOURCE)
    want = engine.complete(prefix_at(SOURCE, 5), 16).choices[0].text
    r = run("complete", teacher_dir, "--file", src, "--line", 5, "--max-tokens", 16)
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"
    r = run("complete", teacher_dir, "--line", 5, "--max-tokens", 16, input=SOURCE)  # the file on stdin
    assert r.exit_code == 0 and r.stdout == want + "\n"
    r = run("complete", teacher_dir, "--max-tokens", 16, input=prefix_at(SOURCE, 5))  # the prefix on stdin
    assert r.exit_code == 0 and r.stdout == want + "\n"
    want = engine.complete(prefix_at(SOURCE, 5, 9), 16).choices[0].text
    r = run("complete", teacher_dir, "--file", src, "--line", 5, "--col", 9, "--max-tokens", 16, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["completions"][0]["text"] == want and out["total_ms"] > 0
    r = run("complete", teacher_dir, "--file", src, "--line", 99)
    assert r.exit_code == 2 and "--line 99" in r.output


def test_cli_beams_and_alternatives(teacher_dir):
    best = run("complete", teacher_dir, "--beams", 3, "--max-tokens", 8, input=SOURCE[:50])
    alts = run("complete", teacher_dir, "--n", 3, "--max-tokens", 8, input=SOURCE[:50])
    assert best.exit_code == 0 and alts.exit_code == 0, alts.output
    lines = alts.stdout.split("\n")[:-1]
    assert 1 <= len(lines) <= 3 and len(set(lines)) == len(lines)
    assert lines[0] + "\n" == best.stdout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_student_loads_in_its_dtype(tokenizer, tmp_path, dtype):
    d = tmp_path / "half"
    make_gpt2(tokenizer, n_layer=2).to(dtype).save_pretrained(d)
    tokenizer.save_pretrained(d)
    e = load_engine(str(d), device="cpu", warm_up=False)
    assert e.dtype == str(dtype).replace("torch.", "")
    assert e.complete(SOURCE[:40], 6).choices[0].finish_reason in ("stop", "length")
    r = run("complete", d, "--max-tokens", 6, input=SOURCE[:40])
    assert r.exit_code == 0, r.output


def test_int8_student_completes_through_load_model(tmp_path, teacher_dir, corpus_dir):
    from kdcode.compression.compress import run_compress
    from kdcode.spec import DataSpec
    from kdcode.spec_compress import CompressSpec

    spec = CompressSpec(
        data=DataSpec(source=str(corpus_dir)), calib_batches=1, calib_batch_size=2, calib_block_size=32, int8=True
    )
    out, _ = run_compress(str(teacher_dir), spec, tmp_path / "int8")
    e = load_engine(str(out), device="cpu", warm_up=False)
    assert e.dtype.startswith("int8")
    r = run("complete", out, "--max-tokens", 6, "--json", input=SOURCE[:40])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["completions"][0]["finish_reason"] in ("stop", "length")


def test_help_lists_the_options_with_the_specs_defaults():
    for cmd, flag, default in (("complete", "--max-tokens", "(48)"), ("serve", "--max-tokens-limit", "(128)")):
        r = run(cmd, "-h")
        assert r.exit_code == 0, r.output
        line = next(x for x in r.output.splitlines() if flag + " " in x)
        assert f"[default: {default}]" in line and "--fim-order" in r.output, line
