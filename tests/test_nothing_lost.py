"""Issue 17, "Nothing lost, nothing crashes": outputs never destroy inputs, a full or read-only disk is one clear
line found as early as it can be, trained work survives a failed final save, inputs are read with bounded memory,
damaged folders are one line, leftovers of killed runs are cleaned, and long work reports progress in a pipe.

Disk tests use a real small filesystem (a tmpfs mounted here; skipped, with the reason, where that is not allowed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import EVAL_FAST, FAST, one_clear_line

from kdcode.models.artifacts import MANIFEST, verify


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real filesystem of ``size`` at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        why = done.stderr.strip() or "mount failed"
        pytest.skip(f"cannot mount a small tmpfs here ({why}); the disk tests need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ 1: outputs vs inputs
@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_an_output_that_is_inside_or_holds_the_teacher_is_refused_even_with_overwrite(where, tmp_path, teacher_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    before = sorted(p.name for p in teacher.iterdir())
    out = {"is": teacher, "inside": teacher / "student", "contains": tmp_path}[where]
    r = run("distil", "--teacher", teacher, "--out", out, "--overwrite", *FAST)
    one_clear_line(r, f"the input --teacher {teacher}; writing there would destroy it")
    assert sorted(p.name for p in teacher.iterdir()) == before


def test_outputs_of_other_commands_are_checked_against_their_inputs(tmp_path, student, corpus_dir):
    one_clear_line(run("compress", student, "--out", student / "int8", "--int8"), "lies inside the input MODEL")
    one_clear_line(run("distil", "--teacher", student, "--data", corpus_dir, "--out", corpus_dir / "s", *FAST),
                   "lies inside the input --data")
    one_clear_line(run("eval", student, "--data", corpus_dir, *EVAL_FAST, "--json", student / "metrics.json"),
                   "--json " + str(student / "metrics.json") + " lies inside the input MODEL")
    one_clear_line(run("eval", student, "--data", corpus_dir, *EVAL_FAST, "--predictions", student / "config.json"),
                   "--predictions " + str(student / "config.json") + " lies inside the input MODEL")
    assert verify(student) is True


# ------------------------------------------------------------------------------ 2: writing fails
@pytest.mark.slow
def test_a_disk_too_small_is_found_before_loading(tmp_path, teacher_dir, corpus_dir):
    with tmpfs(tmp_path / "small", "64k") as disk:
        r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", disk / "s", *FAST)
        one_clear_line(r, "MB free; writing")
        assert "distil" not in r.output.split("error:")[0]  # nothing trained: no progress was shown
        assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_a_read_only_out_is_found_before_loading(tmp_path, teacher_dir, corpus_dir):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as disk:
        r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", disk / "s", *FAST)
        one_clear_line(r, "Read-only file system")


@pytest.mark.slow
def test_a_disk_that_fills_during_training_is_one_line_and_leaves_nothing_half_written(
    tmp_path, teacher_dir, corpus_dir, monkeypatch
):
    import kdcode.train.distil as distil

    real = distil.train_loop
    with tmpfs(tmp_path / "disk", "2m") as disk:

        def fill_the_disk(*args, **kwargs):
            result = real(*args, **kwargs)
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * max(free - 8192, 0))  # another program took the space
            return result

        monkeypatch.setattr(distil, "train_loop", fill_the_disk)
        r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", disk / "s", *FAST)
        line = one_clear_line(r, f"cannot write {disk / 's'}: ")
        assert "No space left on device" in line
        assert "checkpoint" in line  # it says whether the trained weights could be kept
        assert not (disk / "s").exists() and _leftovers(disk) == []


@pytest.mark.slow
def test_compress_to_a_full_disk_is_one_line(tmp_path, student, monkeypatch):
    import kdcode.models.artifacts as artifacts

    with tmpfs(tmp_path / "disk", "512k") as disk:
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 4096))
        r = run("compress", student, "--out", disk / "fp16", "--dtype", "fp16")
        one_clear_line(r, "MB free")  # found before loading
        (disk / "filler").unlink()
        real = artifacts._save

        def fill_then_save(*args, **kwargs):  # the disk fills between the check and the write
            (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 4096))
            return real(*args, **kwargs)

        monkeypatch.setattr(artifacts, "_save", fill_then_save)
        r = run("compress", student, "--out", disk / "fp16", "--dtype", "fp16")
        one_clear_line(r, "No space left on device")
        assert not (disk / "fp16").exists() and _leftovers(disk) == []


@pytest.mark.slow
def test_a_failed_final_save_keeps_the_trained_weights_and_resume_writes_them(
    tmp_path, teacher_dir, corpus_dir, monkeypatch
):
    """A library error that wraps a disk error (safetensors' SafetensorError is not an OSError) at the final save:
    the final weights stay in OUT.ckpt, and the same command with --resume writes the student without training."""
    import kdcode.models.artifacts as artifacts

    class SafetensorError(Exception):
        pass

    real = artifacts._save
    calls = []

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  'message: "No space left on device" })')
        return real(*args, **kwargs)

    monkeypatch.setattr(artifacts, "_save", full_once)
    out = tmp_path / "s"
    args = ["distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", out, *FAST, "--max-steps", "3"]
    r = run(*args)
    line = one_clear_line(r, f"cannot write {out}: Error while serializing")
    assert f"the trained weights (step 3) are in {out}.ckpt" in line and "--resume" in line
    assert not out.exists() and (out.with_name("s.ckpt") / "state.json").is_file()
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    m = json.loads((out / MANIFEST).read_text())
    assert m["training"]["steps"] == 3 and len((out / "train_log.jsonl").read_text().splitlines()) == 3
    assert "distil 4->2 layers" not in r.output.split("student written")[0].split("\n")[-1]
    assert verify(out) is True and not out.with_name("s.ckpt").exists()


# ------------------------------------------------------------------------------ 6: smaller items
def test_leftovers_of_a_killed_overwrite_are_cleaned_or_restored(tmp_path, student):
    from kdcode.models.artifacts import clean_stale_temps

    dead = 2**22 + 12345  # above pid_max's default: no such process
    out = tmp_path / "student"
    spent = tmp_path / f".student.old-{dead}"
    shutil.copytree(student, spent)
    os.utime(spent, (0, 0))
    assert clean_stale_temps(out) == [spent] and not spent.exists() and out.exists()
    # killed between the two renames: the old folder is the only complete copy, and is put back
    shutil.move(str(out), str(spent))
    assert clean_stale_temps(out) == [spent] and verify(out) is True


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--lr", "inf"], "train.lr: Input should be a finite number"),
        (["--max-minutes", "inf"], "train.max_minutes: Input should be a finite number"),
        (["--layers", "9"], "student.layers=9 is outside 1..4 (the depth of teacher"),
    ],
)
def test_validate_refuses_what_cannot_run(flags, phrase, teacher_dir):
    one_clear_line(run("distil", "--teacher", teacher_dir, *flags, "--validate"), phrase)


def test_validate_refuses_true_for_a_number(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("train: {batch_size: true, max_steps: 3}\n")
    one_clear_line(run("distil", "--spec", spec, "--validate"), "batch_size: true is a yes/no value")


@pytest.mark.slow
def test_an_unreachable_hub_fails_fast_without_retry_chatter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kdcode", "distil", "--teacher", "nobody/no-such-model", "--out",
                           str(tmp_path / "s")], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0] and "unreachable" in lines[0], lines
    assert took < 30, f"took {took:.0f} s"


def test_long_work_logs_plain_lines_when_not_a_terminal(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    import kdcode.progress
    import kdcode.train.runlog

    monkeypatch.setattr(kdcode.train.runlog, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setattr(kdcode.progress, "PLAIN_EVERY_S", 0.0)
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--out", tmp_path / "s", *FAST)
    assert r.exit_code == 0, r.output
    assert "distil 4->2 layers: step 1/2, loss" in r.output and "tokens/s" in r.output and "eta" in r.output
    r = run("eval", tmp_path / "s", "--data", corpus_dir, "--samples", "4", "--max-new-tokens", "2",
            "--ppl-blocks", "0", "--batch-size", "1")
    assert r.exit_code == 0, r.output
    assert "/4 (" in r.output and "/s" in r.output


# ------------------------------------------------------------------------------ 5: damaged folders
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def damage(draw, files: list[str]):
    name = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["truncate", "flip", "delete", "garbage", "other_json", "huge_header", "huge_shape",
                                 "no_tokenizer"]))
    return name, kind, draw(st.integers(0, 2**31)), draw(_JSON), draw(st.booleans())


def _damage(folder: Path, name: str, kind: str, seed: int, value, plain: bool) -> None:
    import random
    import struct

    rng = random.Random(seed)
    path = folder / name
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: rng.randrange(max(len(data), 1))])
    elif kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))
    elif kind == "delete":
        path.unlink()
    elif kind == "no_tokenizer":
        for f in folder.glob("*"):
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                f.unlink()
    elif kind == "garbage":
        path.write_bytes(rng.randbytes(rng.randint(0, 256)))
    elif kind == "other_json":
        path.write_text(json.dumps(value))
    elif kind == "huge_header" and name.endswith(".safetensors"):
        path.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    elif kind == "huge_shape" and name.endswith(".safetensors"):
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [2**40, 2**40]
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    if plain and (folder / MANIFEST).exists():
        (folder / MANIFEST).unlink()  # a plain Hugging Face folder: no sha256 to catch the damage first


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_a_model_folder_is_one_line_or_a_correct_load(data, student_src, tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged") / "m"
    shutil.copytree(student_src, folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    name, kind, seed, value, plain = data.draw(damage(files))
    _damage(folder, name, kind, seed, value, plain)
    no_verify = data.draw(st.booleans())
    args = ["complete", str(folder), "--max-tokens", "2", *(["--no-verify"] if no_verify else [])]
    r = run(*args, input="def f(x):\n    return ")
    assert "Traceback" not in r.output, r.output
    if r.exit_code != 0:
        errors = [x for x in r.output.splitlines() if x.startswith("error: ")]
        assert r.exit_code == 2 and len(errors) == 1, (name, kind, r.output)
