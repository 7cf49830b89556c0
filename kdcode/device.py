"""Where models run: device choice (``auto|cpu|cuda[:N]``), its description, dtypes, threads, bf16 support, memory.

One policy for training, evaluation, benchmarks, completion and serving. Errors name the flag and the fix.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

import psutil
import torch

from kdcode.errors import KdcodeError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
_CUDA = re.compile(r"^cuda(:\d+)?$")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DTYPE_HELP = "auto (the dtype the model's config names), fp32, fp16 or bf16."


def torch_dtype(name: str) -> Any:
    """``"auto"`` or the torch dtype of ``fp32`` / ``fp16`` / ``bf16``."""
    table = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise KdcodeError(f"--dtype {name!r}: use {DTYPE_HELP}")
    return table[name]


def resolve_device(requested: str | None = "auto") -> Any:
    """A ``torch.device`` for ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not _CUDA.match(name):
        raise KdcodeError(f"--device {requested!r}: use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise KdcodeError(f"--device {requested} was asked for, but no CUDA device is available; use --device cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise KdcodeError(
            f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s) (0..."
            f"{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads for torch (None: leave torch's choice); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def model_device(model: Any) -> Any:
    """The device a model's logits come out on: its parameters', or what a backend's model says
    (:class:`kdcode.inference.backends.base.StepModel`)."""
    device = getattr(model, "backend_device", None)
    return device if device is not None else next(model.parameters()).device


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: Any) -> str:
    """``cuda:<GPU name>`` or ``cpu:<processor> [<instruction sets>]``, as manifests and reports record it: the
    instruction sets decide kernels, so they travel with every figure."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_name()} [{' '.join(cpu_features()) or 'no AVX2'}]"


# /proc/cpuinfo flags that change kdcode's results or speed, by the name reports give them
CPU_FEATURES = {
    "avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
}


def cpu_flags() -> set[str]:
    """The CPU's flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_features() -> list[str]:
    """The instruction sets that decide kernels here: e.g. ``["AVX2", "AVX-512", "AVX512-VNNI", "AMX-BF16"]``."""
    flags = cpu_flags()
    return [name for flag, name in CPU_FEATURES.items() if flag in flags]


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX or AVX512-BF16); else autocast is a slowdown."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (VNNI or AMX-INT8), what makes 8-bit matmuls pay."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def torch_kernels() -> str:
    """The vector instruction set ATen's CPU kernels dispatch to (``DEFAULT``, ``AVX2``, ``AVX512``, ...): the
    same command gives other low bits on another path."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # pragma: no cover - torch < 2.1
        return "unknown"


def machine_line() -> str:
    """One line naming what a figure was measured on: CPU, its instruction sets, torch's kernels, threads."""
    features = " ".join(cpu_features()) or "no AVX2"
    return f"{cpu_name()} [{features}] torch kernels {torch_kernels()}, {torch.get_num_threads()} threads"


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM is its own (ru_maxrss survives exec on Linux, so a spawned
    child would report its parent's peak when that is higher)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if platform.system() == "Darwin" else 2**10)


def memory_mb(device: Any) -> float:
    """Memory in use now: allocated CUDA memory, or the process's RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return rss_mb()


def peak_memory_mb(device: Any) -> float:
    """Peak memory: max allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
