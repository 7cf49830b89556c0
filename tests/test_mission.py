"""Issue 23, the mission's own command, tested: `kdcode distil --teacher microsoft/CodeGPT-small-py --layers 8`
and `kdcode bench ./student`, exactly as a user types them, offline, against a model (and a dataset) placed in a
standard Hugging Face hub cache (``HF_HOME/hub/models--ORG--NAME/{refs,snapshots,blobs}``).

The cached model has CodeGPT-small-py's layout (a 12-layer GPT-2 with CodeGPT's special tokens) at a tiny width.
Everything runs in subprocesses with their own HF_HOME, as a user's shell would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcode.models.load import bundled_path

pytestmark = pytest.mark.slow

MODEL_ID = "microsoft/CodeGPT-small-py"
MODEL_COMMIT = "3b4fd5a1c0f2e6d7a8b9c0d1e2f3a4b5c6d7e8f9"
DATA_ID = "codeparrot/py-snippets"
DATA_COMMIT = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b"


def _cache_repo(hf_home: Path, kind: str, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` as the hub client does: blobs (LFS ones named by their sha256), snapshot symlinks, refs."""
    repo = hf_home / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        lfs = name.endswith((".safetensors", ".jsonl"))
        blob = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(repo / "blobs" / blob, target.parent))
    return snap


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    home = tmp_path_factory.mktemp("hf_home")
    src = tmp_path_factory.mktemp("codegpt_src")
    tok = AutoTokenizer.from_pretrained(bundled_path())  # CodeGPT's special tokens: <s> </s> <pad> <EOL> ...
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=12, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(src)
    tok.save_pretrained(src)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    _cache_repo(home, "model", MODEL_ID, MODEL_COMMIT, files)
    stdlib = Path(bundled_path()).parents[2]  # any real code: kdcode's own sources
    rows = [json.dumps({"path": str(p.relative_to(stdlib)), "code": p.read_text(encoding="utf-8")})
            for p in sorted(stdlib.rglob("*.py"))[:40]]
    data = {"data/train.jsonl": "\n".join(rows[:30]).encode(), "data/validation.jsonl": "\n".join(rows[30:34]).encode(),
            "data/test.jsonl": "\n".join(rows[34:]).encode()}
    _cache_repo(home, "dataset", DATA_ID, DATA_COMMIT, data)
    return home


def kdcode(*args: str, cwd: Path, hf_home: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("kdcode")
    cmd = [exe] if exe else [sys.executable, "-m", "kdcode"]
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


FAST = ["--max-steps", "2", "--batch-size", "2", "--block-size", "64", "--precision", "fp32"]


def test_the_mission_command_from_a_hub_cache(hf_home, tmp_path):
    r = kdcode("distil", "--teacher", MODEL_ID, "--layers", "8", *FAST, cwd=tmp_path, hf_home=hf_home)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "Writing model shards" not in r.stderr  # no third-party bars
    manifest = json.loads((tmp_path / "student" / "kdcode.json").read_text())
    teacher = manifest["teacher"]
    weights = hf_home / "hub" / "models--microsoft--CodeGPT-small-py" / "snapshots" / MODEL_COMMIT / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert teacher["hub"] == {"id": MODEL_ID, "revision": MODEL_COMMIT, "requested_revision": None,
                              "weights_sha256": {"model.safetensors": sha}}
    assert teacher["verified"] is True  # the LFS blob is named by its sha256, and matches it
    # the default init (auto) keeps spread's blocks or the contiguous run of lowest calibration loss, as it measured
    measured = manifest["init"]["origin"]["measured"]
    start = min(range(len(measured["loss_by_start"])), key=measured["loss_by_start"].__getitem__)
    run = [j for j in range(12) if not start <= j < start + 4]
    expected = [0, 2, 3, 5, 6, 8, 9, 11] if measured["chosen"] == "spread" else run
    assert teacher["fingerprint"] == sha and manifest["layer_map"] == expected
    print(json.dumps(teacher, indent=2))

    # the manifest is enough to get the same teacher again: --teacher-revision pins the commit
    r = kdcode("distil", "--teacher", MODEL_ID, "--teacher-revision", MODEL_COMMIT, "--layers", "8", *FAST,
               "--out", "pinned", cwd=tmp_path, hf_home=hf_home)
    assert r.returncode == 0, r.stderr
    pinned = json.loads((tmp_path / "pinned" / "kdcode.json").read_text())["teacher"]["hub"]
    assert pinned["revision"] == MODEL_COMMIT and pinned["requested_revision"] == MODEL_COMMIT
    r = kdcode("distil", "--teacher", MODEL_ID, "--teacher-revision", "f" * 40, "--layers", "8", *FAST,
               "--out", "missing", cwd=tmp_path, hf_home=hf_home)
    assert r.returncode == 2 and f"at revision {'f' * 40} is not in the Hugging Face cache" in r.stderr

    r = kdcode("bench", "./student", "--compare", MODEL_ID, "--prompts", "2", "--new-tokens", "2",
               "--json", "bench.json", cwd=tmp_path, hf_home=hf_home)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    for header in ("params (M)", "size (MB)", "weights in mem (MB)", "peak mem (MB)", "samples/s", "ms/token p50",
                   "first token (ms)"):
        assert header in r.stdout  # a pipe gets the whole table: nothing cut to 80 columns
    assert "…" not in r.stdout and "size xNone" not in r.stdout and "size x" in r.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["compare"]["size_mb"] == round(weights.stat().st_size / 1e6, 3)
    assert result["compare"]["source"]["hub"] == {"id": MODEL_ID, "revision": MODEL_COMMIT}
    assert result["ratios"]["size"] is not None


def test_a_hub_dataset_from_the_cache_is_recorded_by_id_and_revision(hf_home, tmp_path):
    r = kdcode("distil", "--teacher", MODEL_ID, "--layers", "4", "--data", DATA_ID, *FAST, cwd=tmp_path,
               hf_home=hf_home)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "student" / "kdcode.json").read_text())["data"]
    assert data["hub"]["id"] == DATA_ID and data["hub"]["revision"] == DATA_COMMIT
    assert data["files"] == {"train": 30, "valid": 4, "test": 6}
