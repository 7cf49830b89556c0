"""The only writer of model folders: atomic save, manifest, integrity check on load.

A student folder is a plain Hugging Face folder (safetensors weights, config, tokenizer) plus
``kdcode.json`` (the manifest) and a generated ``README.md`` model card. Writes go to a hidden temp
folder beside the target, which is renamed into place only once complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

from kdcode import __version__
from kdcode.errors import KdcodeError
from kdcode.quiet import quiet_hf

MANIFEST = "kdcode.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def weights_sha256(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in weight_files(folder)}


def weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


def library_versions() -> dict[str, str]:
    out = {"kdcode": __version__}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def check_out_dir(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an existing non-empty output folder unless ``overwrite`` (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise KdcodeError(f"{flag} {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise KdcodeError(f"{flag} {out} exists and is not empty; choose another folder or pass --overwrite")


def _temp_owner(path: Path, out: Path) -> int | None:
    """The pid in a temp folder name ``.{out.name}.tmp-{pid}-{random}`` (None for other layouts)."""
    head = path.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


# When this process started (near enough: kdcode.artifacts is imported before any work is done).
# psutil's process create_time is not used: it can be a second early (boot time is whole seconds).
_STARTED = time.time()
# Temp folders without a pid in their name (kdcode <= 0.1.0) must also be this old to be removed.
LEGACY_TEMP_AGE_S = 3600


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp folders that killed runs left beside ``out``; returns what was removed.

    Only folders named ``.{out.name}.tmp-*`` are considered, and only those last modified before this
    process started whose owner (the pid in the name) is no longer running; a name without a pid must
    also be an hour old. A concurrent writer's temp folder is never touched.
    """
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        try:
            if path.is_symlink() or not path.is_dir():
                continue
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if mtime >= _STARTED:
            continue
        owner = _temp_owner(path, out)
        if owner is None and time.time() - mtime < LEGACY_TEMP_AGE_S:
            continue
        if owner is not None and (owner == os.getpid() or psutil.pid_exists(owner)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for path in out.parent.glob(f".{glob.escape(out.name)}.old-*"):  # a killed --overwrite's previous folder
        head = path.name[len(f".{out.name}.old-") :]
        if not head.isdigit() or int(head) == os.getpid() or psutil.pid_exists(int(head)) or not path.is_dir():
            continue
        if out.exists():  # the swap finished: the old folder is spent
            shutil.rmtree(path, ignore_errors=True)
        else:  # killed between the two renames: the old folder is the only complete copy; put it back
            os.replace(path, out)
        removed.append(path)
    return removed


def clean_stale_temp_files(out: Path) -> list[Path]:
    """Remove the temp files (``.{out.name}.tmp-{pid}-*``) that killed runs writing the single file ``out`` left;
    the same rules as :func:`clean_stale_temps` (older than this process, owner gone), files only."""
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_mtime >= _STARTED:
                continue
        except OSError:
            continue
        owner = _temp_owner(path, out)
        if owner is None or owner == os.getpid() or psutil.pid_exists(owner):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies inside it (both resolved)."""
    return path.resolve().is_relative_to(root.resolve())


def utc_now(timestamp: float | None = None, timespec: str = "seconds", zulu: bool = False) -> str:
    """A UTC time in ISO 8601 (``timestamp``: seconds since the epoch, None: now): ``+00:00`` as manifests and sweep
    records write it, ``Z`` with ``zulu`` as Ollama's API does."""
    when = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    text = when.isoformat(timespec=timespec)
    return text.replace("+00:00", "Z") if zulu else text


def check_output(
    out: Path,
    overwrite: bool = False,
    inputs: dict[str, Any] | None = None,
    need_bytes: int | None = None,
    folder: bool = True,
    flag: str = "--out",
) -> None:
    """Everything about an output path that can be checked before any work (loading a model, training):

    - it is not, does not contain and does not lie inside any input (``{"--teacher": path, ...}``; hub ids
      and None are skipped), ``--overwrite`` or not: an output never replaces what it is made from;
    - an existing non-empty folder needs ``overwrite`` (``folder=True``); leftovers of killed runs are cleaned;
    - its folder is writable (a file is created and removed there), and has ``need_bytes`` free (with 10% margin).
    """
    out = Path(out)
    target = out.expanduser().resolve()
    for name, value in (inputs or {}).items():
        if value is None:
            continue
        src = Path(str(value)).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if inside(src, target) or inside(target, src):
            how = "is" if target == src else "contains" if inside(src, target) else "lies inside"
            raise KdcodeError(
                f"{flag} {out} {how} the input {name} {value}; writing there would destroy it: choose another {flag}"
            )
    if folder:
        clean_stale_temps(out)
        check_out_dir(out, overwrite, flag)
    elif out.is_dir():
        raise KdcodeError(f"{out} is a folder; give a file path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise KdcodeError(
            f"cannot write to {parent} ({exc.strerror or exc}); choose an --out on a writable disk"
        ) from exc
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes * 1.1:
            raise KdcodeError(
                f"{parent} has {free / 1e6:.1f} MB free; writing {out} needs about {need_bytes / 1e6:.1f} MB: "
                "free space or choose an --out on another disk"
            )


_DISK_WORDS = ("no space left", "read-only file system", "permission denied", "disk quota", "input/output error")


def write_error(exc: BaseException, target: Path | str) -> KdcodeError:
    """A failure to write ``target`` as one line: the system's reason (disk full, read-only, permissions), also
    when a library wraps it (safetensors' SafetensorError is not an OSError); anything else is named."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) or any(w in text.lower() for w in _DISK_WORDS):
        reason = getattr(exc, "strerror", None) or text[:200] or type(exc).__name__
        return KdcodeError(f"cannot write {target}: {reason}")
    return KdcodeError(f"cannot save {target}: {type(exc).__name__}: {text[:300]}")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it replaces ``out`` in one rename.

    A run killed at any moment leaves either no ``out`` (or the old one) or the complete new one; its
    temp folder ``.{out.name}.tmp-{pid}-*`` is removed by the next run writing to ``out``.
    """
    clean_stale_temps(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755 & ~current_umask())  # mkdtemp makes 0700; a model folder is shared like any other
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _init_name(init: Any) -> Any:
    return init.get("name") if isinstance(init, dict) else init  # {name, params}; a plain name before 0.2


def model_card(manifest: dict[str, Any]) -> str:
    spec = manifest.get("spec", {})
    lines = [
        f"# {manifest.get('kind', 'student')} made by kdcode {manifest.get('kdcode_version')}",
        "",
        f"Created {manifest.get('created_at')}.",
        "",
        "Load it with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    compression = manifest.get("compression") or {}
    if (compression.get("layout") or {}).get("loader") == "kdcode":  # head-pruned or int8 folders
        lines[4:11] = [
            f"Load it with kdcode ({compression.get('loading')}):",
            "",
            "```python",
            "from kdcode.models.load import load_model",
            'lm = load_model("PATH")  # lm.model, lm.tokenizer',
            "```",
        ]
    if compression:
        steps = ", ".join(s.get("step", "?") for s in compression.get("steps", []))
        lines.append(f"- Compressed ({steps}) from `{(compression.get('parent') or {}).get('path')}`")
    teacher = manifest.get("teacher")
    if teacher:
        lines += [
            f"- Teacher: `{teacher.get('name')}` ({teacher.get('n_layer')} layers, {teacher.get('params_m')}M params)",
            f"- Strategy: `{spec.get('strategy', {}).get('name')}` {spec.get('strategy', {}).get('params') or ''}",
            f"- Init: `{_init_name(spec.get('student', {}).get('init'))}`, layer map {manifest.get('layer_map')}",
        ]
    model = manifest.get("model", {})
    if model:
        lines.append(f"- Model: {model.get('n_layer')} layers, {model.get('params_m')}M params")
    data = manifest.get("data", {})
    if data:
        lines.append(f"- Data: `{data.get('source')}`, files per split {data.get('files')}")
    training = manifest.get("training", {})
    if training:
        lines.append(
            f"- Training: {training.get('steps')} steps, {training.get('tokens_seen')} tokens, "
            f"{training.get('wall_time_s')} s on {training.get('device')}; final losses {training.get('final')}"
        )
    for name, metrics in (manifest.get("metrics") or {}).items():
        lines.append(f"- Metrics `{name}`: {json.dumps(metrics)}")
    return "\n".join(lines) + "\n"


def save_model(
    out: Path,
    model: Any,
    tokenizer: Any,
    manifest: dict[str, Any],
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write model + tokenizer + manifest + card to ``out`` atomically. Returns ``out``."""
    try:
        _save(out, model, tokenizer, manifest, overwrite, extra, quiet_hf)
    except KdcodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - disk full, read-only, permissions, or a library's wrapper of them
        raise write_error(exc, out) from exc
    return out


def _save(out: Path, model: Any, tokenizer: Any, manifest: dict[str, Any], overwrite: bool,
          extra: Callable[[Path], None] | None, quiet: Any) -> None:
    with atomic_dir(out, overwrite) as tmp, quiet():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        full = {
            "kdcode_version": __version__,
            "created_at": utc_now(),
            **manifest,
            "weights_sha256": weights_sha256(tmp),
            "libraries": library_versions(),
        }
        write_json(tmp / MANIFEST, full)
        (tmp / "README.md").write_text(model_card(full), encoding="utf-8")


def _publish(tmp: str, path: Path) -> None:
    """A finished temp file renamed to ``path``, readable as any file the user writes (0644 less the umask; mkstemp
    makes 0600)."""
    os.chmod(tmp, 0o644 & ~current_umask())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename in the same folder)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The manifest's sections that kdcode reads, and the JSON type each must have when present.
_MANIFEST_SHAPE: dict[str, tuple[type, ...]] = {
    "weights_sha256": (dict,),
    "compression": (dict, type(None)),
    "model": (dict,),
    "metrics": (dict, type(None)),
    "training": (dict, type(None)),
    "spec": (dict, type(None)),
    "kdcode_version": (str,),
}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's ``kdcode.json`` (None without one); one clear error when it is not JSON or of the wrong shape."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise KdcodeError(f"{path} is not valid JSON ({exc}); the folder is damaged, re-create it") from exc
    problem = None
    if not isinstance(data, dict):
        problem = f"it holds a JSON {type(data).__name__}, not an object"
    else:
        for key, kinds in _MANIFEST_SHAPE.items():
            if key in data and not isinstance(data[key], kinds):
                problem = f"{key!r} is a JSON {type(data[key]).__name__}"
                break
        sha = data.get("weights_sha256") or {}
        if problem is None and not all(isinstance(k, str) and isinstance(v, str) for k, v in sha.items()):
            problem = "'weights_sha256' must map file names to hex digests"
        layout = (data.get("compression") or {}).get("layout") if problem is None else None
        if problem is None and layout is not None and not isinstance(layout, dict):
            problem = "'compression.layout' is not an object"
    if problem:
        raise KdcodeError(f"{path} has the wrong shape ({problem}); the folder is damaged, re-create it")
    return data


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def verify(folder: Path) -> bool | None:
    """Check weights against the manifest. True: verified; None: no manifest (plain HF folder)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    made_by = str(manifest.get("kdcode_version", "0"))
    if _version_tuple(made_by) > _version_tuple(__version__):
        raise KdcodeError(
            f"{folder} was made by kdcode {made_by}, newer than this kdcode {__version__}; upgrade kdcode"
        )
    expected: dict[str, str] = manifest.get("weights_sha256", {})
    actual_files = {p.name for p in weight_files(folder)}
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise KdcodeError(f"{path} is missing (listed in {MANIFEST}); the folder is incomplete, re-create it")
        if sha256_file(path) != digest:
            raise KdcodeError(
                f"{path} does not match the sha256 in {MANIFEST} (edited or corrupted); "
                "re-create it, or pass --no-verify to load it anyway"
            )
    extra = actual_files - set(expected)
    if extra:
        raise KdcodeError(
            f"{folder} holds weight files not listed in {MANIFEST}: {', '.join(sorted(extra))}; "
            "remove them or pass --no-verify"
        )
    return True


def update_metrics(folder: Path, name: str, metrics: dict[str, Any]) -> None:
    """Record ``metrics`` under manifest["metrics"][name], atomically; the card follows."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise KdcodeError(f"{folder} has no {MANIFEST}; --record needs a kdcode model folder")
    manifest.setdefault("metrics", {})[name] = metrics
    write_json(folder / MANIFEST, manifest)
    (folder / "README.md").write_text(model_card(manifest), encoding="utf-8")


# ------------------------------------------------------------------ layouts kdcode rebuilds on load
def kdcode_layout(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A folder's ``compression.layout`` ({} for a plain Hugging Face folder)."""
    return ((manifest or {}).get("compression") or {}).get("layout") or {}


def check_trainable(manifest: dict[str, Any] | None, what: str) -> None:
    """Refuse to train an int8 folder: its weights are packed int8 buffers, not parameters."""
    if kdcode_layout(manifest).get("int8"):
        parent = ((manifest or {}).get("compression") or {}).get("parent") or {}
        where = f" ({parent['path']})" if parent.get("path") else ""
        raise KdcodeError(f"{what} is int8 (kdcode compress --int8) and cannot be trained; use its float parent{where}")


def record_layout(manifest: dict[str, Any], heads: list[int] | None, source: str) -> None:
    """Give the manifest of a trained model that kept a head-pruned shape (``heads``: per layer, from
    :func:`kdcode.compression.prune.heads_per_layer`) from ``source`` the ``compression`` section that
    :func:`kdcode.compression.load.load_compressed` rebuilds it from (nothing for a plain shape)."""
    if not heads:
        return
    manifest.setdefault("model", {})["heads_per_layer"] = heads
    manifest["compression"] = {
        "layout": {"loader": "kdcode", "heads_per_layer": heads, "int8": None},
        "loading": "kdcode.models.load_model only: layers have fewer attention heads than n_head",
        "inherited_from": source,
    }
