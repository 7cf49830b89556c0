"""Corpora, deterministic file-level splits, and tokenisation into training blocks.

A corpus is a list of documents (one per source file or record), each with a stable key (its path
relative to the corpus root, or its record id). The split of a document is a function of a hash of
its key alone, so test files never enter training whatever else changes. With :mod:`kdcode.data.records`, one of
the two modules that import ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcode.data.py150 import SKIP_REASON, Py150Error, is_normalised, normalise
from kdcode.data.records import load_dataset
from kdcode.errors import KdcodeError
from kdcode.quiet import quiet_hf
from kdcode.spec import DataSpec

SPLITS = ("train", "valid", "test")
STDLIB = "stdlib"
TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    key: str
    text: str


@dataclass
class Corpus:
    source: str
    splits: dict[str, list[Document]]
    skipped: Counter = field(default_factory=Counter)
    hub: dict[str, Any] | None = None  # a hub dataset: id, config, resolved revision (commit)

    def summary(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "files": {s: len(d) for s, d in self.splits.items()},
            "chars": {s: sum(len(x.text) for x in d) for s, d in self.splits.items()},
            "skipped": dict(self.skipped),
        }
        if self.hub:
            out["hub"] = self.hub
        return out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(key: str, valid_fraction: float, test_fraction: float) -> str:
    """train/valid/test from the first 8 bytes of sha256(key): stable across machines and runs."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _read_text(path: Path, skipped: Counter, spec: DataSpec) -> str | None:
    """A source file's text, or None (counted in ``skipped``) when it is unreadable, too large, has a line over
    the limit, is not UTF-8 or is empty. The size is checked before reading, so memory stays bounded."""
    try:
        if path.stat().st_size > spec.max_file_bytes:
            skipped["over_max_file_bytes"] += 1
            return None
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["non_utf8"] += 1
        return None
    except OSError:
        skipped["unreadable"] += 1
        return None
    if not text.strip():
        skipped["empty"] += 1
        return None
    if len(text) > spec.max_line_chars and max(map(len, text.splitlines())) > spec.max_line_chars:
        skipped["over_max_line_chars"] += 1
        return None
    return text


def skip_reasons(skipped: Counter, spec: DataSpec) -> str:
    """Why files were skipped, in words (with the setting that raises a limit)."""
    words = {
        "empty": "empty",
        "non_utf8": "not UTF-8 text",
        "unreadable": "unreadable",
        "over_max_file_bytes": f"over {spec.max_file_bytes} bytes (data.max_file_bytes raises it)",
        "over_max_line_chars": f"with a line over {spec.max_line_chars} characters (data.max_line_chars raises it)",
    }
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in sorted(skipped.items()))


def bounded_lines(fh: Any, limit: int, skipped: Counter) -> Any:
    """(line number, bytes) of a binary file, each line read with at most ``limit + 1`` bytes in memory; a longer
    line is skipped to its end and counted as ``over_max_file_bytes`` (a record that large is not code)."""
    lineno = 0
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            skipped["over_max_file_bytes"] += 1
            while raw and not raw.endswith(b"\n"):  # drop the rest of the line, a bounded chunk at a time
                raw = fh.readline(limit + 1)
            continue
        yield lineno, raw


def _folder_docs(root: Path, spec: DataSpec, skipped: Counter) -> list[Document]:
    is_stdlib = spec.source == STDLIB
    docs = []
    for path in sorted(root.glob(spec.glob)):
        if not path.is_file():
            continue
        rel = path.relative_to(root)
        if is_stdlib and ("site-packages" in rel.parts or (spec.exclude_tests and TEST_DIRS & set(rel.parts))):
            continue
        text = _read_text(path, skipped, spec)
        if text is not None:
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        detail = f" (skipped: {skip_reasons(skipped, spec)})" if skipped else ""
        raise KdcodeError(
            f"no usable files matching {spec.glob!r} under {root}{detail}; check --data or set the glob "
            "(data.glob in the spec)"
        )
    return docs


def _record_text(record: dict[str, Any], spec: DataSpec) -> str | None:
    value = record.get(spec.field)
    if isinstance(value, list):  # CodeXGLUE token-level layout: a list of code tokens
        value = " ".join(str(v) for v in value)
    return value if isinstance(value, str) else None


def _jsonl_docs(path: Path, spec: DataSpec, skipped: Counter) -> list[Document]:
    docs = []
    with path.open("rb") as fh:
        for lineno, raw in bounded_lines(fh, spec.max_file_bytes, skipped):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skipped["bad_json"] += 1
                continue
            text = _record_text(record, spec) if isinstance(record, dict) else None
            if text is None:
                skipped[f"no_{spec.field}_field"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            key = str(record.get("path") or record.get("id") or f"{path.name}:{lineno}")
            docs.append(Document(key, text))
    if not docs:
        raise KdcodeError(
            f"{path} holds no records with a text field {spec.field!r}; set data.field to the field holding code"
        )
    return docs


def _hf_docs(name: str, spec: DataSpec, skipped: Counter, origin: dict[str, Any]) -> Any:
    """Documents of a hub dataset (its own splits when it has train/valid/test, else one list); ``origin`` gets
    its id, config and resolved revision."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise KdcodeError("the 'datasets' package is needed for Hugging Face datasets: pip install datasets") from exc
    try:
        ds, resolved = load_dataset(datasets, name, spec.revision)
    except KdcodeError:
        raise
    except Exception as exc:
        raise KdcodeError(
            f"--data {name!r} is neither a local file/folder nor a loadable Hugging Face dataset "
            f"({type(exc).__name__}); check the path, or download the dataset where the hub is reachable"
        ) from exc
    origin.update(resolved)
    aliases = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    flat: list[Document] = []
    own_splits = set(ds.keys()) <= set(aliases)
    for split_name, rows in ds.items():
        for i, record in enumerate(rows):
            text = _record_text(record, spec)
            if not text or not text.strip():
                skipped["empty"] += 1
                continue
            if len(text) > spec.max_file_bytes:
                skipped["over_max_file_bytes"] += 1
                continue
            doc = Document(str(record.get("path") or record.get("id") or f"{split_name}:{i}"), text)
            (out[aliases[split_name]] if own_splits else flat).append(doc)
    return out if own_splits else flat


# CodeXGLUE's py150 layout: one normalised file ("<s> ... </s>") per line, in these files.
PY150_SPLIT_FILES = {"train": "train.txt", "valid": "dev.txt", "test": "test.txt"}


def is_py150_dir(path: Path) -> bool:
    """True when ``path`` holds CodeXGLUE-layout split files (``kdcode data prepare`` output)."""
    found = False
    for name in PY150_SPLIT_FILES.values():
        file = path / name
        if file.is_file():
            with file.open("rb") as fh:
                first = fh.readline().strip()
            if first and not first.startswith(b"<s>"):
                return False
            found = True
    return found


def _py150_dir_docs(root: Path, spec: DataSpec, skipped: Counter) -> dict[str, list[Document]]:
    """The split files of a py150 folder as documents, one per line, keyed ``file:line``; the folder's own split."""
    if spec.format != "py150":
        raise KdcodeError(f"{root} holds CodeXGLUE py150 split files (normalised code); pass --format py150")
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for split, name in PY150_SPLIT_FILES.items():
        file = root / name
        if not file.is_file():
            continue
        with file.open("rb") as fh:
            lines = [(n, raw.decode("utf-8", errors="replace")) for n, raw in bounded_lines(fh, spec.max_file_bytes,
                                                                                             skipped)]
        for lineno, line in lines:
            text = line.strip()
            if not text:
                continue
            if not (text.startswith("<s>") and text.endswith("</s>")):
                text = f"<s> {text} </s>"  # as CodeXGLUE's run_lm.py reads such a line
            out[split].append(Document(f"{name}:{lineno}", text))
    return out


def to_py150(docs: list[Document], skipped: Counter) -> list[Document]:
    """Normalise source files; documents that already are py150 lines (CodeXGLUE data) pass unchanged."""
    out: list[Document] = []
    for doc in docs:
        out.extend([doc] if is_normalised(doc.text) else normalise_documents([doc], skipped))
    return out


def load_corpus(spec: DataSpec) -> Corpus:
    """Read the corpus ``spec.source`` and split it by file (see ``split_of``)."""
    skipped: Counter = Counter()
    origin: dict[str, Any] = {}
    source = spec.source
    if source == STDLIB:
        docs: Any = _folder_docs(stdlib_root(), spec, skipped)
    else:
        path = Path(source).expanduser()
        if path.is_dir() and is_py150_dir(path):
            docs = _py150_dir_docs(path, spec, skipped)
        elif path.is_dir():
            docs = _folder_docs(path, spec, skipped)
        elif path.is_file() and path.suffix == ".jsonl":
            docs = _jsonl_docs(path, spec, skipped)
        elif path.is_file():
            text = _read_text(path, skipped, spec)
            if text is None:
                raise KdcodeError(f"--data {path} cannot be used: {skip_reasons(skipped, spec)}")
            docs = [Document(path.name, text)]
        elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise KdcodeError(f"--data {source!r} does not exist; pass a folder, a .jsonl file or a dataset id")
        else:
            docs = _hf_docs(source, spec, skipped, origin)
    if isinstance(docs, dict):
        splits = docs
    else:
        if spec.max_files is not None:
            # A hash of its own: sorting by split_of's hash would keep only the files that hash lowest, all test.
            docs = sorted(docs, key=lambda d: hashlib.sha256(b"max_files:" + d.key.encode()).hexdigest())
            docs = docs[: spec.max_files]
        splits = {s: [] for s in SPLITS}
        for doc in docs:
            splits[split_of(doc.key, spec.valid_fraction, spec.test_fraction)].append(doc)
    if spec.format == "py150":
        splits = {s: to_py150(d, skipped) for s, d in splits.items()}
    return Corpus(source=source, splits=splits, skipped=skipped, hub=origin or None)


def fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.key.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()


def encode_documents(docs: list[Document], tokenizer: Any) -> list[int]:
    """One token stream: each document's tokens followed by the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    batch = 256
    for i in range(0, len(docs), batch):
        chunk = [d.text for d in docs[i : i + batch]]
        with quiet_hf():  # long files: no "longer than the specified maximum" warning (blocks are cut later)
            encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    return stream


def to_blocks(stream: list[int], block_size: int) -> Any:
    """Non-overlapping blocks of ``block_size`` tokens (the ragged tail is dropped)."""
    n = len(stream) // block_size
    if n == 0:
        raise KdcodeError(
            f"the data holds {len(stream)} tokens, fewer than one block of {block_size}; "
            "add files or lower --block-size"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def data_section(corpus: Corpus, train_blocks: Any, valid_blocks: Any, spec_format: str) -> dict[str, Any]:
    """The manifest's ``data`` section: the corpus summary, split fingerprints, token and block counts."""
    return {
        **corpus.summary(),
        "format": spec_format,
        "fingerprint": {s: fingerprint(d) for s, d in corpus.splits.items()},
        "train_tokens": int(train_blocks.numel()),
        "valid_tokens": int(valid_blocks.numel()),
        "train_blocks": len(train_blocks),
    }


def train_blocks(corpus: Corpus, tokenizer: Any, block_size: int, fim: Any = None) -> Any:
    """Training blocks of the train split; ``fim`` (a :class:`kdcode.data.fim.Transform`) rearranges them."""
    stream = encode_documents(corpus.splits["train"], tokenizer)
    return to_blocks(fim.stream(stream, block_size) if fim is not None else stream, block_size)


def split_blocks(corpus: Corpus, tokenizer: Any, block_size: int, fim: Any = None) -> tuple[Any, Any]:
    """Training blocks of the train split (FIM-transformed by ``fim``), and of the valid split (none when it is
    shorter than a block). Validation blocks stay plain: held-out losses compare with runs without FIM."""
    train = train_blocks(corpus, tokenizer, block_size, fim)
    valid_stream = encode_documents(corpus.splits["valid"], tokenizer)
    valid = to_blocks(valid_stream, block_size) if len(valid_stream) >= block_size else train[:0]
    return train, valid


# ------------------------------------------------------------------ CodeXGLUE py150 documents
def normalise_documents(
    docs: list[Document], skipped: Counter, literals: Any = None
) -> list[Document]:
    """Normalise each document, keeping its key; untokenizable ones are dropped and counted in ``skipped``."""
    out = []
    for doc in docs:
        try:
            text = normalise(doc.text, literals) if literals is not None else normalise(doc.text)
        except Py150Error:
            skipped[SKIP_REASON] += 1
            continue
        out.append(Document(key=doc.key, text=text))
    return out


def write_splits(splits: dict[str, list[Document]], out: Path) -> dict[str, int]:
    """Write CodeXGLUE's layout: ``train.txt``, ``dev.txt``, ``test.txt`` under ``out``, one normalised file a line.

    Each file is written to a temporary name and renamed, so a split file is never half written. Returns the
    number of files per split file name.
    """
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, name in PY150_SPLIT_FILES.items():
        docs = splits.get(split, [])
        for doc in docs:
            if not is_normalised(doc.text):
                raise Py150Error(f"{doc.key} is not a normalised py150 file")
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(doc.text.strip() + "\n" for doc in docs), encoding="utf-8")
        tmp.replace(out / name)
        counts[name] = len(docs)
    return counts


def prepare_py150(spec: DataSpec, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Normalise the corpus ``spec.source``, split it by file (the usual hash split) and write the split files.

    Returns the corpus summary with ``written`` (files per split file) and ``skipped`` (by reason, including
    :data:`SKIP_REASON` for files that do not tokenize).
    """
    existing = [n for n in PY150_SPLIT_FILES.values() if (out / n).exists()]
    if existing and not overwrite:
        raise KdcodeError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    if out.exists() and not out.is_dir():
        raise KdcodeError(f"--out {out} is a file; pass a folder")
    corpus = load_corpus(spec.model_copy(update={"format": "py150"}))
    if not any(corpus.splits.values()):
        raise KdcodeError(f"no file of {spec.source} could be normalised ({dict(corpus.skipped)} skipped)")
    return {**corpus.summary(), "written": write_splits(corpus.splits, out), "out": str(out)}
