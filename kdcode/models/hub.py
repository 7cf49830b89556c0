"""The Hugging Face hub, as kdcode uses it: is it reachable, what is in the local cache, and the exact
revision (commit) and weight hashes of a hub model or dataset, so that a manifest names what was used.

Offline (``HF_HUB_OFFLINE=1``) or unreachable, everything resolves from the cache at once: no retries, no
waiting, one clear line when something is not there.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from kdcode.errors import KdcodeError
from kdcode.models.artifacts import sha256_file

HUB_URL = "https://huggingface.co"
HUB_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_status(timeout: float = HUB_TIMEOUT_S) -> dict[str, Any]:
    """{"reachable": True/False/None, "detail": ...}; None when HF_HUB_OFFLINE turns the hub off."""
    if offline():
        return {"reachable": None, "detail": f"offline (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')})"}
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:  # the hub answered, with an error code: still reachable
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"reachable": False, "detail": f"unreachable ({reason})"}
    return {"reachable": True, "detail": f"reachable (HTTP {status} in {time.perf_counter() - start:.2f} s)"}


def cache_only() -> bool:
    """True when hub files must come from the local cache: offline, or the hub does not answer in 3 s."""
    return offline() or hub_status()["reachable"] is not True


def cache_dir() -> Path:
    return Path(constants.HF_HUB_CACHE)


def snapshot(repo_id: str, revision: str | None = None, repo_type: str = "model") -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a commit, branch or tag; default main), or None."""
    try:
        path = snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None
    except Exception:  # noqa: BLE001 - an invalid id raises its own validation error: not in the cache, then
        return None
    return Path(path) if path and Path(path).is_dir() else None


def not_cached(repo_id: str, revision: str | None, repo_type: str = "model") -> KdcodeError:
    at = f" at revision {revision}" if revision else ""
    what = "dataset" if repo_type == "dataset" else "model"
    flag = "--data" if repo_type == "dataset" else "a local folder"
    return KdcodeError(
        f"the {what} {repo_id!r}{at} is not in the Hugging Face cache ({cache_dir()}) and the hub is "
        f"{'off (HF_HUB_OFFLINE)' if offline() else 'unreachable'}: download it where the hub is reachable "
        f"(`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}"
        f"{f' --revision {revision}' if revision else ''}`) or pass {flag}"
    )


def file_sha256(path: Path) -> tuple[str, bool | None]:
    """(sha256 of a cached file, verified): a Git LFS blob is stored under its sha256, so a cached weight file
    can be checked against its own name (True); None when its blob is not named by a sha256."""
    digest = sha256_file(path)
    blob = Path(os.path.realpath(path)).name
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        if blob != digest:
            raise KdcodeError(
                f"{path} in the Hugging Face cache does not match its own sha256 (a damaged download): delete "
                f"{Path(os.path.realpath(path))} and download it again"
            )
        return digest, True
    return digest, None


def describe_snapshot(repo_id: str, requested: str | None, folder: Path) -> dict[str, Any]:
    """What a manifest records of a hub model: id, resolved commit, the revision asked for, weight hashes."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    hashes, checks = {}, []
    for f in weights:
        hashes[f.name], ok = file_sha256(f)
        checks.append(ok)
    return {
        "id": repo_id,
        "revision": folder.name,  # the snapshot folder is named by its commit
        "requested_revision": requested,
        "snapshot": str(folder),
        "weights_sha256": hashes,
        "weights_bytes": sum(f.stat().st_size for f in weights),
        "verified": True if checks and all(checks) else None,
    }
