"""`kdcode sweep` and `kdcode report`: expansion of a sweep spec, and a two-point sweep end to end with resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run

from kdcode.errors import KdcodeError
from kdcode.spec import SweepSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def md_rows(out: Path) -> dict[str, list[str]]:
    lines = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert rows[0][:2] == ["Model", "Params (M)"]
    return {r[0]: r for r in rows[1:]}


# --------------------------------------------------------------------------------------- expansion
def test_plan_expands_grid_then_points_with_placeholders_and_caches(tmp_path):
    from kdcode.study.sweep import plan_sweep

    out = str(tmp_path / "s")
    spec = SweepSpec(
        base={
            "strategy": {"name": "in-training", "params": {"temperature": 3.0}},
            "out": "ignored",
            "train": {"max_steps": 5},
        },
        grid={"strategy.name": ["in-training", "pretraining"], "student.layers": [2, 3]},
        points=[
            {"name": "hard", "strategy.name": "hard-only", "student": {"layers": 2}},
            {"name": "pre", "student.init.name": "pretrained", "student.init.params.path": "{out}/hard"},
            {"name": "cool", "strategy": {"name": "pretraining", "params": {"temperature": 1.0}}},
        ],
        eval={"samples": 3, "data": {"glob": "*.py"}},
        out=out,
    )
    plan = plan_sweep(spec)
    names = [p.name for p in plan.points]
    assert names == ["in-training-2L", "in-training-3L", "pretraining-2L", "pretraining-3L", "hard", "pre", "cool"]
    by = {p.name: p for p in plan.points}
    assert by["in-training-2L"].run.strategy.params == {"temperature": 3.0}  # same strategy: base params kept
    assert by["pretraining-2L"].run.strategy.params == {}  # another strategy starts from its defaults
    assert by["hard"].run.strategy.params == {} and by["hard"].run.student.layers == 2
    assert by["pre"].run.student.init.params == {"path": f"{out}/hard"}
    assert all(p.run.out == str(Path(out) / p.name) for p in plan.points)
    assert by["pre"].eval.samples == 3 and by["pre"].eval.data.glob == "*.py"
    assert by["pre"].eval.data.source == by["pre"].run.data.source
    # frozen-teacher points share a cache per temperature; in-training and hard-only need none
    assert [(c.folder.name, c.temperature, c.points) for c in plan.caches] == [
        ("teacher_cache", 2.0, ["pretraining-2L", "pretraining-3L"]),
        ("teacher_cache-2", 1.0, ["cool"]),
    ]
    assert by["pretraining-3L"].run.teacher_cache == str(Path(out) / "teacher_cache")
    assert by["in-training-2L"].run.teacher_cache is None and by["hard"].run.teacher_cache is None
    assert [b.name for b in plan.baselines] == ["teacher"]


@pytest.mark.parametrize(
    ("points", "needle"),
    [
        ([{"name": "a"}, {"name": "a"}], "used twice"),
        ([{"name": "teacher"}], "reserved"),
        ([{"name": "a b"}], "points.0.name"),
        (
            [{"name": "p", "student.init.name": "pretrained", "student.init.params.path": "{out}/q"}, {"name": "q"}],
            "runs later",
        ),
        ([{"name": "p", "strategy.name": "pretrainig"}], "Did you mean 'pretraining'"),
        ([{"name": "p", "student.layres": 3}], "student.layres"),
    ],
)
def test_plan_refuses_bad_points(tmp_path, points, needle):
    from kdcode.study.sweep import plan_sweep

    with pytest.raises(KdcodeError, match=needle):
        plan_sweep(SweepSpec(points=points, out=str(tmp_path / "s")))


def test_sweep_spec_needs_points_and_forbids_unknown_keys(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {}\n")
    r = run("sweep", spec, "--validate")
    assert r.exit_code == 2 and "needs a grid" in r.output
    spec.write_text("grid: {student.layers: [2]}\nevals: {}\n")
    r = run("sweep", spec, "--validate")
    assert r.exit_code == 2 and "evals" in r.output and "unknown key" in r.output
    r = run("sweep")
    assert r.exit_code == 2 and "--layers" in r.output


@pytest.mark.parametrize("name", ["codegpt.yaml", "study.yaml", "study_quick.yaml"])
def test_examples_validate(name):
    r = run("sweep", EXAMPLES / name, "--validate")
    assert r.exit_code == 0, r.output
    assert "sweep is valid: 16 points" in r.output and "8L-pretrained" in r.output


def test_codegpt_example_follows_the_codexglue_protocol():
    from kdcode.study.sweep import load_sweep, plan_sweep

    plan = plan_sweep(load_sweep(EXAMPLES / "codegpt.yaml"))
    for p in plan.points:
        assert p.run.teacher.name == "microsoft/CodeGPT-small-py"
        assert p.run.data.format == "py150" and p.run.train.block_size == 1024
        assert p.eval.beams == 5 and p.eval.context_tokens == 924 and p.eval.max_new_tokens == 100
    assert sorted({p.run.student.layers for p in plan.points}) == [4, 6, 8, 10, 12]


# ------------------------------------------------------------------------------------------ report
def _fake(name, kind, params, size, speed, es, em, status="ok", baseline="teacher"):
    return {
        "name": name,
        "kind": kind,
        "status": status,
        "baseline": baseline,
        "stage": None if status == "ok" else "distil",
        "error": None if status == "ok" else "boom",
        "bench": {"params_m": params, "size_mb": size, "samples_per_s": speed, "device": "cpu"},
        "eval": {"es": es, "em": em, "samples": 4},
    }


@pytest.mark.slow
def test_report_rebuilds_table_and_plot_and_copes_without_matplotlib(tmp_path, monkeypatch):
    import matplotlib.image

    results = tmp_path / "results.jsonl"
    rows = [
        _fake("teacher", "teacher", 124.0, 510.0, 26.0, 39.1, 14.5),
        _fake("8L", "student", 96.0, 390.0, 31.0, 29.6, 6.3, status="failed"),
        _fake("4L", "student", 68.0, 280.0, 43.0, 27.6, 5.9),
        _fake("8L", "student", 96.0, 390.0, 31.0, 29.6, 6.3),
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("report", results, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    table = md_rows(tmp_path / "rep")
    assert list(table) == ["teacher", "8L", "4L"]  # the resumed 8L supersedes its failure, in sweep order
    assert table["teacher"][1:] == ["124", "1.00", "510", "1.00", "26.0", "1.00", "39.10", "1.00", "14.50", "1.00"]
    assert table["4L"][1:3] == ["68.0", "0.55"] and table["4L"][-2:] == ["5.90", "0.41"]
    assert "Failed points" not in (tmp_path / "rep" / "results.md").read_text()
    png = tmp_path / "rep" / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[2] in (3, 4)

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    r = run("report", results, "--out", tmp_path / "bare")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "bare" / "results.md").is_file() and not (tmp_path / "bare" / "pareto.png").exists()
    assert "matplotlib is not installed" in r.output


def test_report_shows_acceptance_columns_when_students_were_measured_as_drafts():
    from kdcode.study.report import table

    teacher = _fake("teacher", "teacher", 124.0, 510.0, 26.0, 39.1, 14.5)
    student = _fake("4L", "student", 68.0, 280.0, 43.0, 27.6, 5.9)
    student["acceptance"] = {"accepted_per_pass": 2.345, "acceptance_rate": 0.586, "draft_tokens": 4, "samples": 4}
    headers, rows = table([teacher, student])
    assert headers[-4:] == ["Accepted/pass", "Accepted/pass ratio", "Acceptance", "Acceptance ratio"]
    assert rows[0][-4:] == ["–", "–", "–", "–"]  # the teacher drafts for nobody
    assert rows[1][-4:] == ["2.35", "–", "0.59", "–"]
    assert "Accepted/pass" not in table([teacher, _fake("4L", "student", 68.0, 280.0, 43.0, 27.6, 5.9)])[0]


# -------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sweep_end_to_end_resumes_after_a_failure(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    import matplotlib.image

    import kdcode.study.sweep

    real = kdcode.study.sweep.run_distil
    calls: list[str] = []
    crashed: list[str] = []

    def flaky(spec, **kw):
        name = Path(spec.out).name
        calls.append(name)
        if name == "2L" and not crashed:  # the first time only
            crashed.append(name)
            raise RuntimeError("simulated crash")
        return real(spec, **kw)

    monkeypatch.setattr(kdcode.study.sweep, "run_distil", flaky)
    # Measure in this process: a spawned benchmark process costs ~20 s of imports per model on a busy CPU
    # (test_cli covers the isolated path).
    real_bench = kdcode.study.sweep.run_bench
    monkeypatch.setattr(kdcode.study.sweep, "run_bench", lambda *a, **k: real_bench(*a, isolate=False, **k))
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--teacher",
        teacher_dir,
        "--data",
        corpus_dir,
        "--layers",
        "1,2",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "64",
        "--precision",
        "fp32",
        "--samples",
        "4",
        "--prompts",
        "2",
        "--new-tokens",
        "2",
        "--threads",
        "1",
        "--out",
        out,
    ]
    r = run(*args)
    assert r.exit_code == 1, r.output
    assert "2L" in r.output and "--resume" in r.output
    first = records(out)
    assert [(x["name"], x["status"]) for x in first] == [("teacher", "ok"), ("1L", "ok"), ("2L", "failed")]
    assert first[2]["error"] == "RuntimeError: simulated crash" and first[2]["stage"] == "distil"
    one = first[1]
    assert one["overrides"] == {"student.layers": 1} and one["spec"]["student"]["layers"] == 1
    assert one["folder"] == str(out / "1L") and (out / "1L" / "kdcode.json").is_file()
    assert one["eval"]["samples"] == 4 and one["bench"]["prompts"] == 2
    assert set(one["wall_s"]) == {"distil", "eval", "bench", "total"}
    # the frozen-teacher (pretraining) points train from one shared cache, built once
    assert one["spec"]["teacher_cache"] == str(out / "teacher_cache")
    assert (out / "teacher_cache" / "cache.json").is_file()
    assert one["teacher_cache"]["build_s"] is not None

    r = run(*args)
    assert r.exit_code == 2 and "--resume" in r.output  # an existing results.jsonl is not overwritten

    calls.clear()
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert calls == ["2L"]  # only the missing point ran (the teacher and 1L were skipped)
    after = records(out)
    assert len(after) == 4 and (after[3]["name"], after[3]["status"]) == ("2L", "ok")
    assert after[3]["teacher_cache"]["build_s"] is None  # the cache was reused

    table = md_rows(out)
    assert list(table) == ["teacher", "baseline: repeat previous line", "1L", "2L"]
    assert table["teacher"][2] == "1.00" and float(table["1L"][2]) < float(table["2L"][2]) < 1
    base = table["baseline: repeat previous line"]  # the trivial floor is a row of its own, ES/EM only
    assert base[1] == "–" and float(base[7]) > 0 and base[8] == f"{float(base[7]) / float(table['teacher'][7]):.2f}"
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "pareto.png").ndim == 3


def _one_layer_sweep(monkeypatch, teacher, corpus, samples: str, new_tokens: str, *extra: object) -> list:
    """The arguments of a one-point sweep (1 layer, 1 step), its bench in this process."""
    import kdcode.study.sweep

    real_bench = kdcode.study.sweep.run_bench
    monkeypatch.setattr(kdcode.study.sweep, "run_bench", lambda *a, **k: real_bench(*a, isolate=False, **k))
    return ["sweep", "--teacher", teacher, "--data", corpus, "--layers", "1", "--max-steps", "1", "--batch-size", "2",
            "--block-size", "64", "--precision", "fp32", "--samples", samples, "--prompts", "1", "--new-tokens",
            new_tokens, "--threads", "1", *extra]


@pytest.mark.slow
def test_sweep_task_infill_adds_an_infill_es_column(tmp_path, fim_teacher_dir, corpus_dir, monkeypatch):
    out = tmp_path / "sweep"
    args = _one_layer_sweep(monkeypatch, fim_teacher_dir, corpus_dir, "4", "2", "--task", "infill", "--out", out)
    r = run(*args)
    assert r.exit_code == 0, r.output
    got = records(out)
    assert [x["name"] for x in got] == ["teacher", "1L"]
    for x in got:
        assert x["infill"]["task"] == "infill" and x["infill"]["samples"] == 4 and "infill" in x["wall_s"]
        assert x["infill_spec"]["task"] == "infill" and x["eval"]["task"] == "line"
        assert x["infill"]["prefix_only"]["es"] == x["eval"]["es"]  # the same holes as line completion
    table = md_rows(out)
    assert len(table["1L"]) == 1 + 2 * 6 and table["1L"][-2] == f"{got[1]['infill']['es']:.2f}"
    assert "Infill ES" in (out / "results.md").read_text()
    r = run(*args, "--resume")
    assert r.exit_code == 0 and "done before, skipped" in r.output and len(records(out)) == 2


@pytest.mark.slow
def test_sweep_draft_tokens_measures_each_student_as_the_teachers_draft(tmp_path, teacher_dir, corpus_dir,
                                                                        monkeypatch):
    out = tmp_path / "sweep"
    args = _one_layer_sweep(monkeypatch, teacher_dir, corpus_dir, "3", "3", "--draft-tokens", "2", "--out", out)
    r = run(*args)
    assert r.exit_code == 0, r.output
    teacher, student = records(out)
    assert teacher["acceptance"] is None and "acceptance" not in teacher["wall_s"]
    acc = student["acceptance"]
    assert acc["draft_tokens"] == 2 and acc["samples"] == 3 and acc["teacher"] == str(teacher_dir)
    assert acc["identical_to_teacher_greedy"] is True and 0 <= acc["acceptance_rate"] <= 1
    assert student["draft_tokens"] == 2 and "acceptance" in student["wall_s"]
    table = md_rows(out)
    assert table["1L"][-4] == f"{acc['accepted_per_pass']:.2f}"
    assert "k=2 draft tokens" in (out / "results.md").read_text()
    assert "1L: done before, skipped" in run(*args, "--resume").output
    again = run(*args[:-4], "--draft-tokens", "3", "--out", out, "--resume").output  # another k: measured again
    assert "1L: done before, skipped" not in again and "bench -> acceptance" in again


def test_sweep_wiring_interrupt_stops_and_resume_continues_checkpoints(tmp_path, monkeypatch):
    """With the heavy calls faked: an eval error is recorded at its stage, Ctrl-C in training stops the
    sweep (nothing recorded for that point), and --resume continues the point's training checkpoint."""
    import kdcode.study.sweep
    from kdcode.train.loop import Interrupted

    teacher = tmp_path / "t"
    teacher.mkdir()
    calls: list[tuple[str, bool]] = []

    def distil(spec, overwrite=False, resume=False):
        name = Path(spec.out).name
        calls.append((name, resume))
        if name == "3L" and not resume:
            ckpt = Path(spec.out + ".ckpt")
            ckpt.mkdir(parents=True)
            (ckpt / "state.json").write_text("{}")
            raise Interrupted("SIGINT at step 1: a checkpoint is in " + str(ckpt))
        return Path(spec.out), {"training": {"steps": 1}}

    def evaluate(name, spec, **kw):
        if name.endswith("2L"):
            raise KdcodeError("no held-out files")
        return {"es": 10.0, "em": 1.0, "samples": spec.samples}

    monkeypatch.setattr(kdcode.study.sweep, "run_distil", distil)
    monkeypatch.setattr(kdcode.study.sweep, "run_eval", evaluate)
    monkeypatch.setattr(kdcode.study.sweep, "run_bench",
                        lambda name, spec, **kw: {"params_m": 1.0, "size_mb": 4.0, "samples_per_s": 2.0})
    out = tmp_path / "s"
    args = ["sweep", "--teacher", teacher, "--layers", "1,2,3", "--strategy", "in-training", "--out", out]
    r = run(*args)
    assert r.exit_code == 130 and "SIGINT" in r.output and "--resume" in r.output
    assert [(x["name"], x["status"], x["stage"]) for x in records(out)] == [
        ("teacher", "ok", None),
        ("1L", "ok", None),
        ("2L", "failed", "eval"),
    ]
    r = run(*args, "--resume")
    assert r.exit_code == 1 and "2L" in r.output  # 2L fails again, the sweep still finishes 3L
    assert calls[-2:] == [("2L", False), ("3L", True)]
    assert [(x["name"], x["status"]) for x in records(out)][-2:] == [("2L", "failed"), ("3L", "ok")]
    assert "`2L` at eval: no held-out files" in (out / "results.md").read_text()
