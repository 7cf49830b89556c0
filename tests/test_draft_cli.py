"""The student as a draft through the commands (issue 22): complete/serve give the teacher's own output,
eval --draft-for measures acceptance (and records it), bench --draft compares speeds with identical outputs; the same
with --draft lookup (prompt lookup, no draft model)."""

from __future__ import annotations

import json

import pytest
from conftest import make_gpt2, run

from kdcode.models.artifacts import MANIFEST, save_model

SOURCE = "import os\n\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    return path\n"


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, teacher_dir, tokenizer):
    """A 2-layer student whose blocks are the teacher's first two (as a layer-copy init starts)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = make_gpt2(tokenizer, n_layer=2)
    student.load_state_dict({k: v for k, v in teacher.state_dict().items()
                             if not k.startswith("transformer.h.") or int(k.split(".")[2]) < 2})
    return save_model(tmp_path_factory.mktemp("draft") / "s2", student, tokenizer, {"kind": "student"})


@pytest.mark.slow
def test_complete_with_a_draft_is_the_teachers_own_output(teacher_dir, draft_dir, tmp_path):
    src = tmp_path / "a.py"
    src.write_text(SOURCE)
    plain = run("complete", teacher_dir, "--file", src, "--line", 5, "--max-tokens", 12, "--json", "--device", "cpu")
    drafted = run("complete", teacher_dir, "--file", src, "--line", 5, "--max-tokens", 12, "--json", "--device",
                  "cpu", "--draft", draft_dir, "--draft-tokens", "3")
    assert plain.exit_code == 0 and drafted.exit_code == 0, drafted.output
    a, b = json.loads(plain.stdout), json.loads(drafted.stdout)
    assert a["completions"] == b["completions"] and b["runtime"]["draft"] == str(draft_dir)
    auto = run("complete", teacher_dir, "--max-tokens", 8, "--json", "--draft", draft_dir, "--draft-tokens", "auto",
               input=SOURCE[:40])
    assert auto.exit_code == 0 and json.loads(auto.stdout)["runtime"]["draft_tokens"] in (1, 2, 3, 4, 6, 8)
    bad = run("complete", teacher_dir, "--draft", draft_dir, "--draft-tokens", "0", input="x = ")
    assert bad.exit_code == 2 and "--draft-tokens '0'" in bad.output


@pytest.mark.slow
def test_complete_with_prompt_lookup_is_the_models_own_output(teacher_dir, tmp_path):
    src = tmp_path / "a.py"
    src.write_text(SOURCE * 2)  # code that repeats itself
    args = ["complete", teacher_dir, "--file", src, "--line", 11, "--max-tokens", 12, "--json", "--device", "cpu"]
    plain = run(*args)
    looked = run(*args, "--draft", "lookup", "--draft-tokens", "3")
    assert plain.exit_code == 0 and looked.exit_code == 0, looked.output
    a, b = json.loads(plain.stdout), json.loads(looked.stdout)
    assert a["completions"] == b["completions"]
    assert b["runtime"]["draft"] == "lookup" and b["runtime"]["lookup_max_n"] == 3
    auto = run("complete", teacher_dir, "--max-tokens", 8, "--json", "--draft", "lookup", "--draft-tokens", "auto",
               input=SOURCE[:40])
    assert auto.exit_code == 0, auto.output
    assert json.loads(auto.stdout)["runtime"]["draft_tokens"] in (1, 2, 3, 4, 6, 8)


def test_the_word_lookup_is_prompt_lookup_even_beside_a_folder_named_lookup(teacher_dir, draft_dir, tmp_path,
                                                                            monkeypatch):
    """``--draft lookup`` drafts by prompt lookup and says, in one warning line, how to name the folder: ./lookup."""
    import shutil

    shutil.copytree(draft_dir, tmp_path / "lookup")
    monkeypatch.chdir(tmp_path)
    word = run("complete", teacher_dir, "--max-tokens", 4, "--json", "--draft", "lookup", input="x = ")
    assert word.exit_code == 0, word.output
    assert json.loads(word.stdout)["runtime"]["draft"] == "lookup"
    assert "warning: --draft lookup drafts by prompt lookup" in word.stderr and "--draft ./lookup" in word.stderr
    assert len(word.stderr.strip().splitlines()) == 1
    folder = run("complete", teacher_dir, "--max-tokens", 4, "--json", "--draft", "./lookup", input="x = ")
    assert folder.exit_code == 0, folder.output
    assert json.loads(folder.stdout)["runtime"]["draft"] == "./lookup" and "warning" not in folder.stderr
    assert json.loads(folder.stdout)["completions"] == json.loads(word.stdout)["completions"]


@pytest.mark.slow
def test_eval_draft_for_measures_and_records_acceptance(teacher_dir, draft_dir, corpus_dir):
    r = run("eval", draft_dir, "--draft-for", teacher_dir, "--data", corpus_dir, "--samples", 8,
            "--max-new-tokens", 8, "--draft-tokens", 3, "--json", "-", "--record")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["draft_tokens"] == 3 and 0 < result["acceptance_rate"] <= 1
    assert result["identical_to_teacher_greedy"] is True and result["samples"] == 8
    recorded = json.loads((draft_dir / MANIFEST).read_text())["metrics"]["acceptance"]
    assert recorded["acceptance_rate"] == result["acceptance_rate"] and recorded["teacher"] == str(teacher_dir)


@pytest.mark.slow
def test_bench_with_a_draft_compares_speeds_on_identical_outputs(teacher_dir, draft_dir, corpus_dir):
    r = run("bench", teacher_dir, "--draft", draft_dir, "--data", corpus_dir, "--prompts", 3, "--rounds", 2,
            "--new-tokens", 6, "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["ratios"]["identical_output"] is True and result["ratios"]["speedup"] > 0
    assert result["with_draft"]["acceptance"]["draft_tokens"] == 4 and result["with_draft"]["draft"] == str(draft_dir)


@pytest.mark.slow
def test_bench_with_prompt_lookup_compares_speeds_on_identical_outputs(teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", teacher_dir, "--draft", "lookup", "--data", corpus_dir, "--prompts", 3, "--rounds", 2,
            "--new-tokens", 8, "--device", "cpu", "--json", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["ratios"]["identical_output"] is True and result["ratios"]["speedup"] > 0
    drafted = result["with_draft"]
    assert drafted["draft"] == "lookup" and drafted["acceptance"]["draft_tokens"] == 4
    assert drafted["acceptance"]["target_passes"] > 0 and drafted["acceptance"]["tokens_per_pass"] >= 1
    assert "+ prompt lookup" in r.stdout and "with prompt lookup:" in r.stdout and "tokens per teacher pass" in r.stdout


def test_a_draft_of_another_vocabulary_is_one_line(teacher_dir, tmp_path, corpus_dir):
    from kdcode.data.bpe import train_bpe

    other_tok = train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:3]], vocab_size=300)
    other = save_model(tmp_path / "other", make_gpt2(other_tok, n_layer=1), other_tok, {"kind": "student"})
    r = run("complete", teacher_dir, "--draft", other, input="x = ")
    assert r.exit_code == 2 and "use different tokenizers" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_serve_with_a_draft_answers_the_teachers_own_completion(teacher_dir, draft_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kdcode.inference.engine import load_engine
    from kdcode.inference.server import create_app

    body = {"model": "any", "prompt": SOURCE[:60], "max_tokens": 12, "temperature": 0, "stop": []}
    answers = []
    for draft in (None, str(draft_dir), "lookup"):
        engine = load_engine(str(teacher_dir), device="cpu", draft=draft, draft_tokens=3)
        with TestClient(create_app(str(teacher_dir), engine=engine)) as client:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["text"])
    assert answers[0] == answers[1] == answers[2] and answers[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bench", "TEACHER", "--draft", "DRAFT", "--compare", "TEACHER"], "--compare does not go with --draft"),
        (["bench", "TEACHER", "--draft", "DRAFT", "--kv-cache", "static", "--compile"],
         "--kv-cache static and --compile do not go with --draft"),
        (["bench", "TEACHER", "--draft", "DRAFT", "--backend", "torch"], "--backend torch does not go with --draft"),
        (["bench", "TEACHER", "--draft", "lookup", "--compare", "TEACHER"],
         "--compare does not go with --draft lookup"),
        (["eval", "DRAFT", "--draft-for", "TEACHER", "--task", "infill"], "--task infill does not go with --draft-for"),
        (["eval", "DRAFT", "--draft-for", "TEACHER", "--predictions", "p.txt"],
         "--predictions does not go with --draft-for"),
        (["eval", "DRAFT", "--draft-for", "TEACHER", "--compile"], "--compile does not go with --draft-for"),
    ],
)
def test_flags_a_draft_run_would_leave_unused_are_refused(teacher_dir, draft_dir, monkeypatch, args, needle):
    """Before: --compare, --task infill, the torch decode flags were dropped in silence (a run of something else)."""
    import kdcode.evaluation.acceptance
    import kdcode.evaluation.bench

    def never(*a, **k):
        raise AssertionError("the run should have been refused before any work")

    monkeypatch.setattr(kdcode.evaluation.bench, "run_bench_draft", never)
    monkeypatch.setattr(kdcode.evaluation.acceptance, "run_acceptance", never)
    names = {"TEACHER": str(teacher_dir), "DRAFT": str(draft_dir)}
    r = run(*(names.get(a, a) for a in args))
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert ("separately" if args[0] == "bench" else "eval without --draft-for") in r.output
