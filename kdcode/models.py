"""Loading models and tokenizers: ``bundled``, a local folder, or a Hugging Face hub id.

Safetensors only unless the user allows pickle; ``trust_remote_code`` only when asked for; kdcode
folders are verified against their manifest unless ``verify=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from kdcode.artifacts import PICKLE_WEIGHTS, read_manifest, sha256_file, verify, weight_files
from kdcode.errors import KdcodeError
from kdcode.quiet import quiet_hf
from kdcode.spec import BUNDLED


def bundled_path() -> Path:
    return Path(str(files("kdcode") / "bundled" / "teacher"))


@dataclass
class Loaded:
    name: str  # what the user passed
    model: Any
    tokenizer: Any
    path: Path | None  # local folder (None for a hub id)
    manifest: dict[str, Any] | None
    verified: bool | None  # True verified, None plain HF folder / hub, False not checked
    fingerprint: str  # sha256 of the weights (local) or the hub commit
    runtime: dict[str, Any] | None = None  # device, dtype and threads when loaded for inference

    @property
    def n_layer(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def params(self) -> int:
        return count_params(self.model)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "fingerprint": self.fingerprint,
            "n_layer": self.n_layer,
            "params_m": round(self.params / 1e6, 3),
            "verified": self.verified,
        }


def count_params(model: Any) -> int:
    """Every weight of ``model``: its parameters, and the int8 weights kdcode keeps as buffers (once each)."""
    from kdcode.compression.int8 import int8_param_count

    return sum(p.numel() for p in model.parameters()) + int8_param_count(model)


def context_length(config: Any, default: int | None = None) -> int | None:
    """The positions a model can attend over (GPT-2 ``n_positions``, others ``max_position_embeddings``)."""
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(n) if n else default


def resolve_path(name: str) -> Path | None:
    """The local folder ``name`` refers to, or None when it must be a hub id."""
    if name == BUNDLED:
        path = bundled_path()
        if not (path / "config.json").is_file():
            raise KdcodeError(
                "the bundled teacher is missing from this installation; reinstall kdcode or pass --teacher DIR"
            )
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KdcodeError(f"{name} is a file; a model is a folder with config.json and weights")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(("/", "\\")):
        raise KdcodeError(f"model folder {name} does not exist; check the path")
    return None


def _check_local(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise KdcodeError(f"{path} has no config.json; it is not a Hugging Face model folder")
    if not weight_files(path):
        if any((path / n).exists() for n in PICKLE_WEIGHTS):
            if not allow_pickle:
                raise KdcodeError(
                    f"{path} holds only pickle weights (pytorch_model.bin), which can run code when loaded; "
                    "convert them to safetensors, or pass --allow-pickle if you trust the source"
                )
        else:
            raise KdcodeError(
                f"{path} has no weight files (*.safetensors); the folder is incomplete: re-create it, "
                "or point at the folder that holds the weights"
            )


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_path(name)
    try:
        with quiet_hf():
            return AutoTokenizer.from_pretrained(
                str(path) if path else name, revision=revision, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as exc:
        raise _load_error(name, path, exc) from exc


def _load_error(name: str, path: Path | None, exc: Exception) -> KdcodeError:
    first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    if path is not None:
        return KdcodeError(f"cannot load the model in {path}: {first}")
    return KdcodeError(
        f"cannot load {name!r} from the Hugging Face hub (offline, or no such model): {first[:200]}. "
        f"Download it where the hub is reachable (`hf download {name} --local-dir DIR`) and pass the folder"
    )


def load_model(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    check: bool = True,
    dtype: Any = None,
) -> Loaded:
    """Load a causal LM and its tokenizer from ``bundled``, a folder, or a hub id."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(name)
    manifest = None
    verified: bool | None = None
    if path is not None:
        _check_local(path, allow_pickle)
        manifest = read_manifest(path)
        verified = verify(path) if check else False
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    from kdcode.artifacts import kdcode_layout
    from kdcode.compression.load import load_compressed

    try:
        if path is not None and kdcode_layout(manifest).get("loader") == "kdcode":  # head-pruned or int8
            model = load_compressed(path, manifest or {})
        else:
            with quiet_hf():
                model = AutoModelForCausalLM.from_pretrained(str(path) if path else name, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: weights that do not fit the config
        if path is None and not allow_pickle and "safetensors" in str(exc).lower():
            raise KdcodeError(
                f"{name!r} on the hub has no safetensors weights, only pickle ones (which can run code); "
                "pass --allow-pickle if you trust it"
            ) from exc
        raise _load_error(name, path, exc) from exc
    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if path is not None:
        files_ = weight_files(path) or [p for n in PICKLE_WEIGHTS if (p := path / n).exists()]
        fingerprint = sha256_file(files_[0]) if len(files_) == 1 else "+".join(sha256_file(p)[:16] for p in files_)
    else:
        fingerprint = str(getattr(model.config, "_commit_hash", None) or revision or "hub")
    return Loaded(name, model, tokenizer, path, manifest, verified, fingerprint)


def check_same_vocab(teacher_tok: Any, student_tok: Any, what: str) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise KdcodeError(
            f"{what} and the teacher use different tokenizers (vocab {len(student_tok)} vs {len(teacher_tok)}); "
            "KD needs one vocabulary: use a student made from this teacher"
        )
