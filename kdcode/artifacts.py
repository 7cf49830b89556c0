"""The only writer of model folders: atomic save, manifest, integrity check on load.

A student folder is a plain Hugging Face folder (safetensors weights, config, tokenizer) plus
``kdcode.json`` (the manifest) and a generated ``README.md`` model card. Writes go to a hidden temp
folder beside the target, which is renamed into place only once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdcode import __version__
from kdcode.errors import KdcodeError

MANIFEST = "kdcode.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


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
    from importlib.metadata import PackageNotFoundError, version

    out = {"kdcode": __version__}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless ``overwrite`` (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise KdcodeError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise KdcodeError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it replaces ``out`` in one rename."""
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
    teacher = manifest.get("teacher")
    if teacher:
        lines += [
            f"- Teacher: `{teacher.get('name')}` ({teacher.get('n_layer')} layers, {teacher.get('params_m')}M params)",
            f"- Strategy: `{spec.get('strategy', {}).get('name')}` {spec.get('strategy', {}).get('params') or ''}",
            f"- Init: `{spec.get('student', {}).get('init')}`, layer map {manifest.get('layer_map')}",
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
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        full = {
            "kdcode_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "weights_sha256": weights_sha256(tmp),
            "libraries": library_versions(),
        }
        write_json(tmp / MANIFEST, full)
        (tmp / "README.md").write_text(model_card(full), encoding="utf-8")
    return out


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename in the same folder)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdcodeError(f"{path} is not valid JSON ({exc}); the folder is damaged, re-create it") from exc


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
