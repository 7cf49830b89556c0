"""`kdcode doctor`: the environment report, the hub check, and the verdict on a model folder."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
import torch
from conftest import make_gpt2, run

from kdcode import __version__
from kdcode.device import cpu_has_bf16
from kdcode.doctor import HUB_URL, check_folder, hub_status
from kdcode.models.artifacts import save_model
from kdcode.models.load import bundled_path


def doctor(*args: object):
    return run("doctor", *args)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("doctor") / "student"
    return save_model(out, make_gpt2(tokenizer, n_layer=1), tokenizer, {"kind": "student"})


def test_report_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "doctor.json"
    r = doctor("--json", path)
    assert r.exit_code == 0, r.output
    report = json.loads(path.read_text())
    assert set(report["versions"]) == {"python", "kdcode", "torch", "transformers", "tokenizers", "safetensors",
                                       "datasets", "accelerate", "numpy", "gguf", "onnxruntime",
                                       "llama_cpp_python"}  # fmt: skip
    assert report["versions"]["torch"] == torch.__version__
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    assert ("AVX2" in report["cpu_features"]) == ("avx2" in flags)
    assert ("AVX-512" in report["cpu_features"]) == ("avx512f" in flags)
    assert ("AMX-BF16" in report["cpu_features"]) == ("amx_bf16" in flags)
    assert report["int8_dot_cpu"] == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    assert report["torch_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert report["versions"]["kdcode"] == __version__
    assert report["device"] in ("cpu",) or report["device"].startswith("cuda:")
    assert isinstance(report["torch_threads"], int) and report["torch_threads"] >= 1
    assert report["bf16_cpu"] is cpu_has_bf16()
    assert report["hub"] == {"reachable": None, "detail": "offline (HF_HUB_OFFLINE=1)"}
    assert report["bundled_teacher"] == {
        "path": str(bundled_path()),
        "present": (bundled_path() / "config.json").is_file(),
    }
    assert report["hf_cache"]
    assert "folder" not in report


def test_report_table(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = doctor()
    assert r.exit_code == 0, r.output
    for label in ("python", "transformers", "device", "cpu instruction sets", "torch kernels", "torch threads",
                  "bf16 (cpu native)", "bundled teacher", "HF cache", "offline (HF_HUB_OFFLINE=1)"):  # fmt: skip
        assert label in r.output


def test_json_to_stdout_is_only_json(monkeypatch, student):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = doctor(student, "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["folder"]["status"] == "verified"


def test_folder_verdicts(student, teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = doctor(student)
    assert r.exit_code == 0 and "verified: weights match the sha256 in kdcode.json" in r.output
    r = doctor(teacher_dir)
    assert r.exit_code == 0 and "unverified: plain Hugging Face folder (no kdcode.json)" in r.output

    edited = tmp_path / "edited"
    shutil.copytree(student, edited)
    with (edited / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\0")
    r = doctor(edited)
    assert r.exit_code == 1
    assert check_folder(str(edited))["status"] == "refused"
    assert "does not match the sha256 in kdcode.json" in check_folder(str(edited))["detail"]

    pickled = tmp_path / "pickled"
    shutil.copytree(teacher_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    verdict = check_folder(str(pickled))
    assert verdict["status"] == "refused" and "--allow-pickle" in verdict["detail"]

    assert check_folder(str(tmp_path / "nope"))["detail"].endswith("does not exist; check the path")
    assert "not a local folder" in check_folder("someone/some-model")["detail"]


class _Response:
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_hub_check_is_one_head_request_with_a_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_urlopen(request, timeout):
        calls.append((request.full_url, request.get_method(), timeout))
        return _Response()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    status = hub_status()
    assert calls == [(HUB_URL, "HEAD", 3.0)]
    assert status["reachable"] is True and status["detail"].startswith("reachable (HTTP 200 in ")


def test_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def fake_urlopen(request, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert hub_status() == {"reachable": False, "detail": "unreachable (Name or service not known)"}
