"""One loader for every command that runs a model (eval, bench, complete, serve): the model and tokenizer on
the asked device, in the asked dtype, with the thread count set, and what was used recorded."""

from __future__ import annotations

from typing import Any

from kdcode.compression.int8 import Int8Linear
from kdcode.device import describe_device, resolve_device, set_threads, torch_dtype
from kdcode.errors import KdcodeError
from kdcode.inference.backends import detect_backend, load_backend
from kdcode.inference.backends.static import StaticTorch
from kdcode.models.artifacts import kdcode_layout, read_manifest, weight_files
from kdcode.models.load import count_params, load_model, resolve_path
from kdcode.spec import RuntimeSpec


def dtype_name(model: Any) -> str:
    """The dtype a model runs in, as kdcode reports it (int8 folders and other backends' models say so)."""
    if isinstance(getattr(model, "dtype_name", None), str):  # kdcode.inference.backends.base.StepModel
        return model.dtype_name

    params = list(model.parameters())
    base = str(params[0].dtype).replace("torch.", "") if params else "float32"
    schemes = sorted({m.activations for m in model.modules() if isinstance(m, Int8Linear)})
    if schemes:
        return f"int8 ({'/'.join(schemes)}) Linear/Conv1D, rest {base}"
    return base


def load_for_inference(
    name: str,
    device: str | None = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    *,
    verify: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    runtime: RuntimeSpec | dict[str, Any] | None = None,
) -> Any:
    """Load ``name`` (a folder, ``bundled`` or a hub id; a GGUF file or an ONNX export for those backends) for
    inference: on ``device`` (``auto``: CUDA when present), in ``dtype``, with ``threads`` CPU threads, in the
    backend and decode path ``runtime`` asks for (:class:`kdcode.spec.RuntimeSpec`). Returns
    :class:`kdcode.models.load.Loaded` whose ``runtime`` says the device, dtype, threads and backend used."""
    rt = runtime if isinstance(runtime, RuntimeSpec) else RuntimeSpec.model_validate(runtime or {})
    backend = detect_backend(name) if rt.backend == "auto" else rt.backend
    if backend != "torch":
        torch_only = [f for f, on in (("--kv-cache static", rt.kv_cache == "static"), ("--compile", rt.compile)) if on]
        if torch_only:
            raise KdcodeError(f"{' and '.join(torch_only)} {'is' if len(torch_only) == 1 else 'are'} for the torch "
                              f"backend; {name} runs in {backend}, which keeps its own cache: drop "
                              f"{'it' if len(torch_only) == 1 else 'them'}")
        return load_backend(name, backend, device, dtype, threads, verify)
    if detect_backend(name) == "onnxruntime":
        raise KdcodeError(f"{name} is a {detect_backend(name)} model; run it with --backend {detect_backend(name)}")
    dev = resolve_device(device)
    wanted = torch_dtype(dtype)
    n_threads = set_threads(threads)
    path = resolve_path(name)
    if path is not None:
        if kdcode_layout(read_manifest(path)).get("int8"):
            if dev.type != "cpu":
                raise KdcodeError(f"{name} is int8, which runs on the CPU only (torch's dynamic int8 kernels); "
                                  "use --device cpu")
            if dtype not in ("auto", "fp32"):
                raise KdcodeError(f"{name} is int8 with float32 around it; drop --dtype {dtype}")
    lm = load_model(name, revision=revision, check=verify, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code, dtype=wanted)
    lm.model.to(dev).eval()
    lm.runtime = {"device": describe_device(dev), "dtype": dtype_name(lm.model), "threads": n_threads,
                  "backend": "torch", "kv_cache": "static" if rt.compile else rt.kv_cache, "compile": rt.compile}
    if rt.compile or rt.kv_cache == "static":
        files = weight_files(lm.folder) if lm.folder else []
        lm.model = StaticTorch(lm.model, rt.compile, count_params(lm.model), files, lm.runtime["dtype"])
    return lm
