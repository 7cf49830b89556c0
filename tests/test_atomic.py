"""Atomicity: a run killed at any moment leaves no ``--out`` folder or a complete, verified one; temp
folders left by a SIGKILL are cleaned by the next run; ``eval --record`` never half-writes the manifest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_gpt2, run

import kdcode.models.artifacts
from kdcode.models.artifacts import MANIFEST, atomic_dir, clean_stale_temps, save_model, verify

ROOT = Path(__file__).resolve().parents[1]


def _temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def _distil(teacher_dir: Path, corpus_dir: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdcode", "distil", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
           "--layers", "2", "--max-steps", "30", "--batch-size", "2", "--block-size", "64", "--precision", "fp32",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KDCODE_DISABLE_PLUGINS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False when it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    raise AssertionError("the distil run neither finished nor reached the kill point")


def _absent_or_complete(out: Path) -> None:
    assert not out.exists() or verify(out) is True, sorted(p.name for p in out.iterdir())


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_nothing_or_a_verified_folder(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "student"
    killed_in_save = False
    for delay in (0.5, 2.0, 4.0, 8.0):
        proc = _distil(teacher_dir, corpus_dir, out)
        start = time.monotonic()
        if _kill_when(proc, lambda s=start, d=delay: time.monotonic() - s >= d):
            _absent_or_complete(out)
            if out.exists():
                # killed after its save had finished (a fast machine): complete, checked above; clear it
                # so the next run may write there
                shutil.rmtree(out)
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()
            assert verify(out) is True
            shutil.rmtree(out)
    # the most dangerous moment: while the student is being written
    proc = _distil(teacher_dir, corpus_dir, out)
    killed_in_save = _kill_when(proc, lambda: bool(_temps(out)))
    _absent_or_complete(out)
    if out.exists():
        # the save finished before the kill landed (or before the poll saw its temp folder): the folder
        # is complete (checked above); clear it so the next run may write there
        shutil.rmtree(out)
    elif killed_in_save:
        assert _temps(out), "a SIGKILL inside the save leaves its temp folder behind"
    # the next run ignores the strays, writes a complete folder, and removes them
    proc = _distil(teacher_dir, corpus_dir, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert verify(out) is True
    assert _temps(out) == []
    # and a SIGKILL after it finished changes nothing
    assert _kill_when(proc, lambda: True) is False
    assert verify(out) is True


def test_clean_stale_temps_touches_only_dead_runs_older_than_this_process(tmp_path):
    out = tmp_path / "student"
    past = time.time() - 7200

    def make(name: str, old: bool = True, file: bool = False) -> Path:
        p = tmp_path / name
        if file:
            p.write_text("x")
        else:
            p.mkdir()
            (p / "model.safetensors").write_text("half")
        if old:
            os.utime(p, (past, past))
        return p

    dead = make(".student.tmp-999999999-abc")  # a pid that cannot be running
    legacy = make(".student.tmp-xyz")  # no pid in the name
    mine = make(f".student.tmp-{os.getpid()}-abc")  # this process's own
    alive = make(".student.tmp-1-abc")  # pid 1 is always running
    fresh = make(".student.tmp-999999998-abc", old=False)  # newer than this process
    other = make(".studentx.tmp-999999999-abc")  # another output's temp
    a_file = make(".student.tmp-999999997-file", file=True)
    removed = clean_stale_temps(out)
    assert sorted(removed) == sorted([dead, legacy])
    for kept in (mine, alive, fresh, other, a_file):
        assert kept.exists()
    # an output name with glob characters matches only itself
    lookalike = make(".sxudent.tmp-999999999-abc")
    assert clean_stale_temps(tmp_path / "s[xyz]udent") == [] and lookalike.exists()


def test_atomic_dir_cleans_stale_temps_and_names_its_own_with_the_pid(tmp_path):
    out = tmp_path / "student"
    stale = tmp_path / ".student.tmp-999999999-old"
    stale.mkdir()
    past = time.time() - 7200
    os.utime(stale, (past, past))
    with atomic_dir(out) as tmp:
        assert tmp.name.startswith(f".student.tmp-{os.getpid()}-")
        assert not stale.exists()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert _temps(out) == []


@pytest.fixture()
def student(tmp_path, tokenizer) -> Path:
    return save_model(tmp_path / "student", make_gpt2(tokenizer, n_layer=2, seed=2), tokenizer, {"kind": "student"})


def test_eval_record_failing_midway_keeps_the_old_manifest(student, corpus_dir, monkeypatch):
    before = (student / MANIFEST).read_bytes()

    def dump_half_then_fail(data, fh, **kwargs):
        fh.write(json.dumps(data, **kwargs)[:50])
        raise OSError(28, "No space left on device")

    fake_json = SimpleNamespace(dump=dump_half_then_fail, dumps=json.dumps, loads=json.loads,
                                JSONDecodeError=json.JSONDecodeError)  # fmt: skip
    monkeypatch.setattr(kdcode.models.artifacts, "json", fake_json)
    r = run("eval", str(student), "--data", str(corpus_dir), "--samples", "2", "--max-new-tokens",
            "2", "--ppl-blocks", "0", "--record")  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "error: cannot write: [Errno 28] No space left on device" in r.output
    assert "Traceback" not in r.output
    assert (student / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in student.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    assert verify(student) is True
    r = run("eval", str(student), "--data", str(corpus_dir), "--samples", "2", "--max-new-tokens",
            "2", "--ppl-blocks", "0", "--record")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((student / MANIFEST).read_text())["metrics"]["eval"]["samples"] == 2
    assert verify(student) is True


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_json_and_text_written_atomically_are_as_readable_as_any_file(tmp_path, umask):
    """mkstemp makes 0600: a sidecar or manifest was unreadable to the group beside a 0644 weight file."""
    from kdcode.models.artifacts import write_json, write_text_atomic

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text_atomic(tmp_path / "b.txt", "x\n")
        (tmp_path / "c.bin").write_bytes(b"x")  # as open() makes any file
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o644 & ~umask, "b.txt": 0o644 & ~umask, "c.bin": 0o666 & ~umask}


SIGTERM_MIDWAY = """
import os, signal, sys
import kdcode.export.gguf_file as gguf_file

def write_gguf(path, *args, **kwargs):  # half a file, then SIGTERM, as `kill PID` during the export
    open(path, "wb").write(b"GGUF half")
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the export")

gguf_file.write_gguf = write_gguf
from kdcode.cli import app
sys.argv = ["kdcode", "export", sys.argv[1], "--format", "gguf", "--out", sys.argv[2], "--overwrite"]
app()
"""


def test_sigterm_during_export_removes_its_temp_files_and_says_so(student_src, tmp_path):
    pytest.importorskip("gguf")
    from kdcode.export.run import run_export
    from kdcode.spec_compress import ExportSpec

    out = tmp_path / "s.gguf"
    run_export(str(student_src), ExportSpec(format="gguf"), out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KDCODE_DISABLE_PLUGINS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_MIDWAY, str(student_src), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["error: terminated (SIGTERM); no output was left half-written"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the old set, and no hidden temp files
