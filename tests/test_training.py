"""The training loop as a production run: resume equivalence, signals, NaN stop, data parallel parity."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run

from kdcode.data.corpus import encode_documents, load_corpus, to_blocks
from kdcode.errors import KdcodeError
from kdcode.models.load import load_model
from kdcode.plugins import make_init, make_strategy
from kdcode.spec import DataSpec, RunSpec, TrainSpec
from kdcode.train.distil import run_distil
from kdcode.train.loop import Interrupted, train_loop
from kdcode.train.optim import lr_at
from kdcode.train.state import RunContext


@pytest.fixture(scope="module")
def blocks(teacher_dir, corpus_dir):
    tok = load_model(str(teacher_dir)).tokenizer
    return to_blocks(encode_documents(load_corpus(DataSpec(source=str(corpus_dir))).splits["train"], tok), 32)


def _fresh(teacher_dir):
    teacher = load_model(str(teacher_dir)).model
    student, layer_map = make_init("spread", {}).build(teacher, 2)
    return teacher, student, layer_map


CFG = TrainSpec(
    max_steps=6, batch_size=4, block_size=32, precision="fp32", warmup_steps=2, checkpoint_every=3, eval_every=10**6
)


@pytest.mark.parametrize("strategy", ["pretraining", "in-training"])
def test_resume_reaches_the_same_weights(tmp_path, teacher_dir, blocks, strategy):
    teacher, straight, layer_map = _fresh(teacher_dir)
    train_loop(straight, make_strategy(strategy, {}), blocks, None, CFG, teacher=teacher, layer_map=layer_map)

    def kill_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpt = tmp_path / "run.ckpt"
    teacher, first, layer_map = _fresh(teacher_dir)
    run = RunContext(checkpoint_dir=ckpt, fingerprint="x")
    with pytest.raises(Interrupted, match="SIGTERM at step 3"):
        train_loop(
            first,
            make_strategy(strategy, {}),
            blocks,
            None,
            CFG,
            teacher=teacher,
            layer_map=layer_map,
            on_step=kill_at_3,
            run=run,
        )
    assert (ckpt / "state.json").is_file() and len((ckpt / "train_log.jsonl").read_text().splitlines()) == 3

    teacher, resumed, layer_map = _fresh(teacher_dir)  # fresh objects: everything comes from the checkpoint
    result = train_loop(
        resumed,
        make_strategy(strategy, {}),
        blocks,
        None,
        CFG,
        teacher=teacher,
        layer_map=layer_map,
        run=RunContext(checkpoint_dir=ckpt, resume=True, fingerprint="x"),
    )
    assert result.steps == 6 and [r["step"] for r in result.log] == [1, 2, 3, 4, 5, 6]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    with pytest.raises(KdcodeError, match="another spec"):
        train_loop(
            _fresh(teacher_dir)[1],
            make_strategy(strategy, {}),
            blocks,
            None,
            CFG,
            teacher=teacher,
            run=RunContext(checkpoint_dir=ckpt, resume=True, fingerprint="y"),
        )


def test_nan_stops_with_step_and_checkpoint(tmp_path, teacher_dir, blocks):
    teacher, student, layer_map = _fresh(teacher_dir)
    strategy = make_strategy("pretraining", {})
    real = strategy.loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 5:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    strategy.loss = poisoned
    cfg = CFG.model_copy(update={"checkpoint_every": 2})
    with pytest.raises(KdcodeError, match=r"became nan at step 4; the last good checkpoint is .*run.ckpt"):
        train_loop(
            student,
            strategy,
            blocks,
            None,
            cfg,
            teacher=teacher,
            layer_map=layer_map,
            run=RunContext(checkpoint_dir=tmp_path / "run.ckpt", fingerprint="x"),
        )
    state = json.loads((tmp_path / "run.ckpt" / "state.json").read_text())
    assert state["__dict__"][0] == ["fingerprint", "x"]


def test_grad_accumulation_matches_full_batch(teacher_dir, blocks):
    results = []
    for accum in (1, 2):
        teacher, student, layer_map = _fresh(teacher_dir)
        cfg = CFG.model_copy(update={"max_steps": 2, "grad_accum": accum, "checkpoint_every": None})
        train_loop(student, make_strategy("pretraining", {}), blocks, None, cfg, teacher=teacher, layer_map=layer_map)
        results.append(student.state_dict())
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-5) for k in results[0])


def test_lr_schedules():
    cfg = TrainSpec(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0.0, 0, cfg) == pytest.approx(0.1)
    assert lr_at(0.5, 50, cfg) == pytest.approx(0.55)
    assert lr_at(1.0, 100, cfg) == pytest.approx(0.1)
    lin = cfg.model_copy(update={"schedule": "linear"})
    assert lr_at(0.25, 25, lin) == pytest.approx(0.1 + 0.9 * 0.75)


def _distil_args(teacher_dir, corpus_dir, out, *extra):
    return [
        "distil",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(corpus_dir),
        "--layers",
        "2",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--precision",
        "fp32",
        "--out",
        str(out),
        *map(str, extra),
    ]


@pytest.mark.slow
def test_sigint_checkpoints_and_resume_completes(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "student"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCODE_DISABLE_PLUGINS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdcode", *_distil_args(teacher_dir, corpus_dir, out, "--max-steps", 100000)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    live = out.with_name("student.ckpt") / "train_log.jsonl"
    deadline = time.time() + 120
    while not live.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert live.exists(), "training never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGINT at step" in err and "--resume" in err
    assert not out.exists() and (out.with_name("student.ckpt") / "state.json").is_file()

    r = run(*_distil_args(teacher_dir, corpus_dir, out, "--max-steps", 100000))
    assert r.exit_code == 2 and "add --resume" in r.output
    r = run(*_distil_args(teacher_dir, corpus_dir, out, "--max-steps", 100000, "--resume", "--lr", 1))
    assert r.exit_code == 2 and "another spec" in r.output


@pytest.mark.slow
def test_resume_through_run_distil(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    spec = RunSpec.model_validate(
        {
            "teacher": {"name": str(teacher_dir)},
            "student": {"layers": 2},
            "data": {"source": str(corpus_dir)},
            "train": {"max_steps": 4, "batch_size": 4, "block_size": 32, "precision": "fp32", "checkpoint_every": 2},
            "out": str(tmp_path / "s"),
        }
    )
    import kdcode.train.distil as distil

    real = distil.train_loop

    def interrupted(*args, **kwargs):
        kwargs["on_step"] = lambda r: os.kill(os.getpid(), signal.SIGTERM) if r["step"] == 2 else None
        return real(*args, **kwargs)

    monkeypatch.setattr(distil, "train_loop", interrupted)
    with pytest.raises(Interrupted):
        run_distil(spec)
    monkeypatch.setattr(distil, "train_loop", real)
    out, manifest = run_distil(spec, resume=True)
    assert manifest["training"]["steps"] == 4
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    assert not Path(f"{out}.ckpt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path, teacher_dir, corpus_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCODE_DISABLE_PLUGINS": "1", "MASTER_ADDR": "127.0.0.1"}
    args = _distil_args(teacher_dir, corpus_dir, tmp_path / "one", "--max-steps", 3)
    one = subprocess.run([sys.executable, "-m", "kdcode", *args], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    args = _distil_args(teacher_dir, corpus_dir, tmp_path / "two", "--max-steps", 3)
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "kdcode",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    logs = [
        [json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in ("one", "two")
    ]
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    m = json.loads((tmp_path / "two" / "kdcode.json").read_text())["training"]
    assert m["world_size"] == 2 and m["launcher"] == "torchrun" and m["global_batch"] == 4


def test_a_field_added_at_its_default_keeps_a_checkpoint_resumable() -> None:
    """--resume after an upgrade that adds a spec field: the fingerprint leaves default-valued fields out, and a
    checkpoint named the older way (every field) is still taken for the same spec."""
    from pydantic import Field

    from kdcode.spec import RunSpec, StudentSpec, resolve_run_spec
    from kdcode.train.state import run_context, spec_fingerprint

    class LaterStudent(StudentSpec):
        added_later: float = Field(0.0, description="a field a later version adds")

    class LaterRun(RunSpec):
        student: LaterStudent = Field(default_factory=LaterStudent)

    flags = {"student": {"layers": 4}, "train": {"max_steps": 7}}
    now, later = resolve_run_spec({}, flags, "flags"), LaterRun.model_validate(flags | {"train": {"max_steps": 7}})
    assert spec_fingerprint(now) == spec_fingerprint(later)
    assert spec_fingerprint(now) != spec_fingerprint(resolve_run_spec({}, {**flags, "train": {"max_steps": 8}}, "f"))
    context = run_context(now, resume=True)
    assert spec_fingerprint(now, exclude_defaults=False) in context.accepted
