"""Where a model runs: torch (transformers, eager, with a growing or a static KV cache, optionally compiled),
ONNX Runtime (a `kdcode export --format onnx` folder) or llama.cpp (a GGUF file).

Every backend gives kdcode's decoder the same thing, a model it calls through
:class:`kdcode.inference.forward.Forward`: new token ids and a cache in, float logits and the grown cache out
(:class:`kdcode.inference.backends.base.StepModel`). Decoding (greedy, beams, sampling, token healing, stops) is
therefore the same code on every backend; only the arithmetic differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcode.device import describe_device, resolve_device, set_threads
from kdcode.errors import KdcodeError
from kdcode.inference.backends.llama import load_gguf
from kdcode.inference.backends.ort import load_onnx
from kdcode.models.load import Loaded, load_tokenizer

BACKENDS = ("torch", "onnxruntime", "llama.cpp")
BACKEND_HELP = ("auto (by what MODEL is: a .gguf file runs in llama.cpp, an ONNX export folder in onnxruntime, "
                "anything else in torch), torch, onnxruntime or llama.cpp.")


def detect_backend(name: str) -> str:
    """The backend a model path asks for: a .gguf file -> llama.cpp, a folder with model.onnx -> onnxruntime."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return "llama.cpp"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnxruntime"
    return "torch"


def load_backend(name: str, backend: str, device: str | None, dtype: str, threads: int | None,
                 verify: bool) -> Any:
    """``name`` loaded for ``backend`` (onnxruntime or llama.cpp) as :class:`kdcode.models.load.Loaded`."""
    if resolve_device(device).type != "cpu":
        raise KdcodeError(f"the {backend} backend runs on the CPU here; use --device cpu")
    if dtype not in ("auto", "fp32"):
        raise KdcodeError(f"--dtype {dtype} is for torch; a {backend} model runs in the precision it was exported in")
    n_threads = set_threads(threads)
    path = Path(name).expanduser()
    if backend == "llama.cpp":
        if not (path.is_file() and path.suffix == ".gguf"):
            raise KdcodeError(f"--backend llama.cpp runs a GGUF file, and {name} is not one; make one with kdcode "
                              "export MODEL --format gguf --out F.gguf")
        model, tokenizer, manifest, verified = load_gguf(path, n_threads, verify)
        fingerprint = (manifest or {}).get("sha256") or ""
    elif backend == "onnxruntime":
        if not path.is_dir():
            raise KdcodeError(f"--backend onnxruntime runs an ONNX export folder, and {name} is not one; make one "
                              "with kdcode export MODEL --format onnx --out DIR")
        model, manifest, verified = load_onnx(path, n_threads, verify)
        tokenizer = load_tokenizer(str(path))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        fingerprint = (manifest.get("weights_sha256") or {}).get("model.onnx", "")
    else:
        raise KdcodeError(f"--backend {backend!r}: use {BACKEND_HELP}")
    lm = Loaded(name, model, tokenizer, path, manifest, verified, fingerprint)
    lm.runtime = {"device": describe_device(resolve_device("cpu")), "dtype": model.dtype_name, "threads": n_threads,
                  "backend": backend}
    return lm
