"""Records: JSON-lines / JSON files, and Hugging Face datasets by id (``NAME[:CONFIG]``, pinned by revision).

With :mod:`kdcode.data.corpus`, one of the two modules that import ``datasets``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcode.errors import KdcodeError
from kdcode.models import hub


def _json_records(path: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl file, or of a .json file holding a list (or, as CodeXGLUE's test.json, JSON lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KdcodeError(f"cannot read {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KdcodeError(f"{path} is not valid JSON ({exc})") from exc
        if not all(isinstance(r, dict) for r in records):
            raise KdcodeError(f"{path} must hold a list of JSON objects")
        return records
    records = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise KdcodeError(f"{path}:{lineno} is not a JSON object ({exc})") from exc
        if not isinstance(record, dict):
            raise KdcodeError(f"{path}:{lineno} is not a JSON object")
        records.append(record)
    return records


# The CodeXGLUE code-completion datasets on the hub need a language config; Python is the py150 one.
_CODEXGLUE_COMPLETION = ("code_x_glue_cc_code_completion_line", "code_x_glue_cc_code_completion_token")


def load_dataset(datasets: Any, source: str, revision: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``datasets.load_dataset`` of ``NAME[:CONFIG]`` at ``revision`` (CodeXGLUE's completion sets default to
    their Python config), and what a manifest records of it: id, config, the resolved revision (commit).

    With the hub off or unreachable, a dataset in the Hugging Face hub cache (``datasets--ORG--NAME/snapshots``)
    is read from its cached snapshot, so its exact commit is known; otherwise ``datasets`` fetches it."""
    name, _, config = source.partition(":")
    if not config and name.rsplit("/", 1)[-1] in _CODEXGLUE_COMPLETION:
        config = "python"
    kwargs = {"revision": revision} if revision else {}
    origin = {"id": name, "config": config or None, "requested_revision": revision, "revision": None}
    if hub.cache_only():
        folder = hub.snapshot(name, revision, repo_type="dataset")
        if folder is not None:
            ds = datasets.load_dataset(str(folder), config) if config else datasets.load_dataset(str(folder))
            return ds, {**origin, "revision": folder.name, "snapshot": str(folder)}
    ds = datasets.load_dataset(name, config, **kwargs) if config else datasets.load_dataset(name, **kwargs)
    folder = hub.snapshot(name, revision, repo_type="dataset")
    return ds, {**origin, "revision": folder.name if folder else None}


def _hf_records(source: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise KdcodeError("the 'datasets' package is needed for Hugging Face datasets: pip install datasets") from exc
    try:
        ds, _ = load_dataset(datasets, source)
    except Exception as exc:
        raise KdcodeError(
            f"{source!r} is neither a local .jsonl/.json file nor a loadable Hugging Face dataset "
            f"({type(exc).__name__}); download it where the hub is reachable and pass the file"
        ) from exc
    names = {"test": ("test",), "valid": ("validation", "valid", "dev"), "train": ("train",)}
    keys = list(ds.keys())
    if split == "all":
        chosen = keys
    else:
        chosen = [k for k in names.get(split, (split,)) if k in keys][:1]
        if not chosen and len(keys) == 1:
            chosen = keys  # e.g. CodeXGLUE's line-level set: its one split ("train") is the test set
    if not chosen:
        raise KdcodeError(f"{source!r} has no {split} split (it has {', '.join(keys)}); pass --split")
    return [dict(record) for k in chosen for record in ds[k]]


def load_records(source: str, split: str = "test") -> list[dict[str, Any]]:
    """JSON records of a local .jsonl/.json file, or of one split of a Hugging Face dataset ``NAME[:CONFIG]``."""
    path = Path(source).expanduser()
    if path.is_file():
        records = _json_records(path)
    elif path.exists() or source.startswith((".", "/", "~")) or path.suffix in (".json", ".jsonl"):
        raise KdcodeError(f"{source} does not exist (or is not a file); pass a .jsonl/.json file or a dataset id")
    else:
        records = _hf_records(source, split)
    if not records:
        raise KdcodeError(f"{source} holds no records")
    return records
