"""`kdcode doctor`: what this installation runs on, and whether a model folder would load.

Everything here only looks: library versions, the device, torch threads, bf16 support, whether the
Hugging Face hub answers (one HEAD request, 3 s timeout, skipped when ``HF_HUB_OFFLINE`` is set), where
the bundled teacher and the HF cache live, and, for a given folder, the same checks ``load_model`` makes
before loading (config, safetensors-only weights, sha256 against ``kdcode.json``) without loading it.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from huggingface_hub import constants

from kdcode import __version__
from kdcode.device import cpu_features, cpu_has_bf16, cpu_has_int8_dot, cpu_name, torch_kernels
from kdcode.errors import KdcodeError
from kdcode.models.artifacts import verify
from kdcode.models.hub import HUB_URL, hub_status  # noqa: F401 - doctor reports it
from kdcode.models.load import _check_local, bundled_path, resolve_path

# the libraries whose versions change kdcode's results or what it can load and run; optional ones say "not installed"
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "datasets", "accelerate", "numpy", "gguf",
             "onnxruntime", "llama_cpp_python")
_TRUE = ("1", "true", "yes", "on")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "kdcode": __version__}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "device": f"cuda:{torch.cuda.get_device_name()}" if cuda else "cpu",
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "torch_kernels": torch_kernels(),
        "int8_dot_cpu": cpu_has_int8_dot(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_cpu": cpu_has_bf16(),
        "bf16_cuda": bool(torch.cuda.is_bf16_supported()) if cuda else None,
    }


def hf_cache_dir() -> str:
    return str(constants.HF_HUB_CACHE)


def bundled_teacher() -> dict[str, Any]:
    path = bundled_path()
    return {"path": str(path), "present": (path / "config.json").is_file()}


def check_folder(name: str) -> dict[str, Any]:
    """Would ``load_model(name)`` accept this folder? status: verified, unverified or refused (with why)."""
    try:
        path = resolve_path(name)
        if path is None:
            raise KdcodeError(f"{name} is not a local folder (a hub id is not checked here)")
        _check_local(path, allow_pickle=False)
        verified = verify(path)
    except KdcodeError as exc:
        return {"path": name, "status": "refused", "detail": str(exc)}
    if verified is None:
        return {"path": str(path), "status": "unverified", "detail": "plain Hugging Face folder (no kdcode.json)"}
    return {"path": str(path), "status": "verified", "detail": "weights match the sha256 in kdcode.json"}


def collect(folder: str | None = None, check_hub: bool = True) -> dict[str, Any]:
    """Everything `kdcode doctor` reports, as one JSON-ready dict."""
    report: dict[str, Any] = {
        "versions": versions(),
        "executable": sys.executable,
        **device_info(),
        "hub": hub_status() if check_hub else {"reachable": None, "detail": "not checked"},
        "bundled_teacher": bundled_teacher(),
        "hf_cache": hf_cache_dir(),
    }
    if folder is not None:
        report["folder"] = check_folder(folder)
    return report


def rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs for a two-column table."""

    def yes_no(v: bool | None) -> str:
        return "n/a" if v is None else ("yes" if v else "no")

    out = [(name, v or "not installed") for name, v in report["versions"].items()]
    bundled = report["bundled_teacher"]
    out += [
        ("device", report["device"]),
        ("cpu", f"{report['cpu']} ({report['cpu_count']} cores)"),
        ("cpu instruction sets", " ".join(report["cpu_features"]) or "none of AVX2/AVX-512/VNNI/AMX"),
        ("torch kernels", report["torch_kernels"]),
        ("int8 dot products (cpu)", yes_no(report["int8_dot_cpu"])),
        ("torch threads", str(report["torch_threads"])),
        ("bf16 (cpu native)", yes_no(report["bf16_cpu"])),
        ("bf16 (cuda)", yes_no(report["bf16_cuda"])),
        ("hub", report["hub"]["detail"]),
        ("bundled teacher", f"{bundled['path']} ({'present' if bundled['present'] else 'missing'})"),
        ("HF cache", report["hf_cache"]),
    ]
    if "folder" in report:
        f = report["folder"]
        out.append((f"folder {f['path']}", f"{f['status']}: {f['detail']}"))
    return out
