"""Loading models and tokenizers: ``bundled``, a local folder, or a Hugging Face hub id.

Safetensors only unless the user allows pickle; ``trust_remote_code`` only when asked for; kdcode
folders are verified against their manifest unless ``verify=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import list_repo_files, snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kdcode.compression.int8 import int8_param_count
from kdcode.compression.load import load_compressed
from kdcode.errors import KdcodeError
from kdcode.models import hub
from kdcode.models.artifacts import PICKLE_WEIGHTS, kdcode_layout, read_manifest, sha256_file, verify, weight_files
from kdcode.models.gguf import gguf_file, import_folder
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
    hub: dict[str, Any] | None = None  # a hub model: id, resolved revision, snapshot, weights' sha256

    @property
    def folder(self) -> Path | None:
        """Where the weights are on disk: the local folder, or the hub model's cached snapshot."""
        return self.path or (Path(self.hub["snapshot"]) if self.hub else None)

    @property
    def n_layer(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def params(self) -> int:
        own = getattr(self.model, "param_count", None)  # a backend's model (kdcode.inference.backends) counts its own
        return int(own) if own is not None else count_params(self.model)

    def describe(self) -> dict[str, Any]:
        """What a manifest records of a model: enough to find the exact same one again."""
        out = {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "fingerprint": self.fingerprint,
            "n_layer": self.n_layer,
            "params_m": round(self.params / 1e6, 3),
            "verified": self.verified,
        }
        if self.hub:
            out["hub"] = {k: self.hub[k] for k in ("id", "revision", "requested_revision", "weights_sha256")}
        source = (self.manifest or {}).get("source") if (self.manifest or {}).get("kind") == "gguf-import" else None
        if source:
            out["gguf"] = source  # the file the weights were dequantized from: path, sha256, quantization, arch
        else:
            out["weights_sha256"] = {p.name: sha256_file(p) for p in weight_files(self.path)} if self.path else None
        return out


def count_params(model: Any) -> int:
    """Every weight of ``model``: its parameters, and the int8 weights kdcode keeps as buffers (once each)."""
    return sum(p.numel() for p in model.parameters()) + int8_param_count(model)


def context_length(config: Any, default: int | None = None) -> int | None:
    """The positions a model can attend over (GPT-2 ``n_positions``, others ``max_position_embeddings``)."""
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(n) if n else default


def weights_bytes(name: str, revision: str | None = None) -> int | None:
    """Bytes of a model's weight files: a local folder's, or a hub model's in the cache (None when not there)."""
    try:
        path = resolve_path(name)
        if path is None:
            path = hub.snapshot(name, revision)
    except KdcodeError:
        return None
    if path is None or not path.is_dir():
        return None
    files = weight_files(path) or [p for n in PICKLE_WEIGHTS if (p := path / n).is_file()]
    return sum(f.stat().st_size for f in files) or None


def read_config(name: str, revision: str | None = None) -> Any:
    """A model's config without its weights (a local folder, or a hub model in the cache); None if not at hand."""
    try:
        path = resolve_path(name) or hub.snapshot(name, revision)
    except KdcodeError:
        return None
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        with quiet_hf():
            return AutoConfig.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - a damaged config is reported when the model is loaded
        return None


def check_depth(name: str, layers: int, revision: str | None = None) -> None:
    """Refuse a student deeper than its teacher before anything is loaded (from the teacher's config alone)."""
    config = read_config(name, revision)
    depth = getattr(config, "num_hidden_layers", None) if config is not None else None
    if depth is not None and not 1 <= layers <= depth:
        raise KdcodeError(
            f"student.layers={layers} is outside 1..{depth} (the depth of teacher {name}); pick a smaller --layers"
        )


def resolve_path(name: str) -> Path | None:
    """The local folder ``name`` refers to, or None when it must be a hub id. A GGUF source (``FILE.gguf``, a folder
    holding one, ``ollama:NAME[:TAG]``, ``smollm2``) is its dequantized folder in kdcode's cache, made once."""
    gguf = gguf_file(name)
    if gguf is not None:
        return import_folder(gguf)
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


def input_path(name: str) -> Path | None:
    """The file or folder on disk a model name refers to (a GGUF export is a file), for output checks."""
    path = Path(name).expanduser()
    return path if path.is_file() else resolve_path(name)


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


# What a hub model needs on disk (weights are added by kind: safetensors, or pickle when allowed).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.safetensors"]


def hub_snapshot(name: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """The local snapshot folder of hub model ``name`` at ``revision``: from the cache when the hub is off or does
    not answer (one clear line when it is not there), else downloaded (only what a model folder needs)."""
    if hub.cache_only():
        folder = hub.snapshot(name, revision)
        if folder is None:
            raise hub.not_cached(name, revision)
        return folder
    try:
        files = list_repo_files(name, revision=revision)
        patterns = list(HUB_PATTERNS)
        if allow_pickle or not any(f.endswith(".safetensors") for f in files):
            patterns += ["*.bin", "*.pt", "*.ckpt"]  # refused on load unless --allow-pickle: the message says so
        with quiet_hf():
            return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - no such repo, no access, a bad revision: one line
        raise KdcodeError(f"cannot download {name!r}{f' at {revision}' if revision else ''} from the Hugging Face "
                          f"hub: {' '.join(str(exc).split())[:200]}") from exc


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of ``bundled``, a folder, or a hub id (from its snapshot)."""
    path = resolve_path(name)
    return _tokenizer(path if path is not None else hub_snapshot(name, revision), trust_remote_code)


def _tokenizer(path: Path, trust_remote_code: bool) -> Any:
    hint = "its tokenizer (tokenizer.json / vocab files) is missing or damaged"
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not list(path.glob("*.tiktoken")):
        raise KdcodeError(f"cannot load the model in {path}: it has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                          "copy them from the model it was made from, or re-create it")
    try:
        with quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - missing or damaged tokenizer files: one line
        raise load_error(path, exc, hint) from exc
    if len(tokenizer) <= 1:
        raise KdcodeError(f"cannot load the model in {path}: its tokenizer is empty ({hint}; re-create it)")
    return tokenizer


# Any one of these makes a tokenizer (a fast tokenizer file, BPE vocab + merges, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


def load_error(path: Path, exc: BaseException, hint: str = "the folder is damaged or incomplete") -> KdcodeError:
    """A model folder that does not load (damaged config, weights or tokenizer files), as one line."""
    text = " ".join(str(exc).split())
    first = (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__
    return KdcodeError(f"cannot load the model in {path}: {type(exc).__name__}: {first} ({hint}; re-create it)")


def load_model(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    check: bool = True,
    dtype: Any = None,
) -> Loaded:
    """Load a causal LM and its tokenizer from ``bundled``, a folder, or a hub id (through its cached snapshot).

    Any damage to a folder (a truncated or corrupt weight file, a manifest or config of the wrong shape, missing
    tokenizer files) is one KdcodeError line, never a traceback.
    """
    local = resolve_path(name)
    path = local if local is not None else hub_snapshot(name, revision, allow_pickle)
    _check_local(path, allow_pickle)
    manifest = read_manifest(path)
    verified: bool | None = verify(path) if check else False
    hub_info = None
    if local is None:
        hub_info = hub.describe_snapshot(name, revision, path)
        verified = hub_info["verified"] if verified is None else verified
    model = _model(path, manifest, allow_pickle, trust_remote_code, dtype)
    tokenizer = _tokenizer(path, trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    files_ = weight_files(path) or [p for n in PICKLE_WEIGHTS if (p := path / n).exists()]
    digests = hub_info["weights_sha256"] if hub_info else {}
    hashes = [digests.get(p.name) or sha256_file(p) for p in files_]
    fingerprint = hashes[0] if len(hashes) == 1 else "+".join(h[:16] for h in hashes)
    return Loaded(name, model, tokenizer, local, manifest, verified, fingerprint, hub=hub_info)


def _model(path: Path, manifest: dict[str, Any] | None, allow_pickle: bool, trust_remote_code: bool, dtype: Any) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if kdcode_layout(manifest).get("loader") == "kdcode":  # head-pruned or int8
            return load_compressed(path, manifest or {}).eval()
        with quiet_hf():
            return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    except KdcodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated weights, absurd headers, a config of the wrong shape...
        raise load_error(path, exc) from exc


def check_vocab(model: Any, tokenizer: Any, what: str) -> None:
    """``model`` scores every token of ``tokenizer`` (its LM head may be padded beyond them, never shorter)."""
    width = int(model.config.vocab_size)
    if width < len(tokenizer):
        raise KdcodeError(
            f"{what} scores {width} tokens but the tokenizer has {len(tokenizer)}: they are not one tokenizer's "
            "model; KD needs a teacher and student of one tokenizer"
        )


def check_same_vocab(teacher_tok: Any, student_tok: Any, what: str, teacher: str = "the teacher",
                     need: str = "KD needs one vocabulary: use a student made from this teacher") -> None:
    """``student_tok`` (``what``) has ``teacher_tok``'s vocabulary (``teacher``), else one line saying what ``need``s
    it (KD by default; speculative decoding names its draft and target)."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise KdcodeError(
            f"{what} and {teacher} use different tokenizers (vocab {len(student_tok)} vs {len(teacher_tok)}); {need}"
        )
