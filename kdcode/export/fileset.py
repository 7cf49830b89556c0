"""Files that belong together (a GGUF, its sidecar manifest, its ollama Modelfile), written all or nothing.

Each file is written to a hidden temp file beside it (``.{name}.tmp-{pid}-*``). Only when every one is complete
are they moved into place, in three steps: the files they replace (``--overwrite``) are set aside as
``.{name}.old-{pid}``, the new ones are renamed in, and the old ones deleted. A failure (or Ctrl-C, SIGTERM) at
any step before the last puts the old files back: the set on disk is the old one or the new one, never a GGUF
beside a sidecar that describes another file. A run killed outright (SIGKILL) between the steps leaves its
set-aside files, which the next run writing the same names puts back (or deletes, when a new file took the name).
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from kdcode.errors import KdcodeError
from kdcode.models.artifacts import clean_stale_temp_files, current_umask, write_error


def _backup(out: Path) -> Path:
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def recover_stale_backups(out: Path) -> list[Path]:
    """The set-aside files ``.{out.name}.old-{pid}`` of killed runs (owner gone): put back where ``out`` is missing,
    deleted where a new ``out`` took its place. Returns the files handled."""
    handled = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
        head = path.name[len(f".{out.name}.old-") :]
        if not head.isdigit() or int(head) == os.getpid() or psutil.pid_exists(int(head)) or not path.is_file():
            continue
        if out.exists():
            path.unlink(missing_ok=True)
        else:
            os.replace(path, out)
        handled.append(path)
    return handled


@contextmanager
def atomic_files(outs: Sequence[Path], mode: int = 0o644) -> Iterator[list[Path]]:
    """Yield one temp path beside each of ``outs`` (in order); when the block returns, move them all into place
    (readable as ``mode`` less the umask, as any file the user writes), or none of them. A failure names the file
    at fault (a KdcodeError); temp files never outlive the call."""
    temps: list[Path] = []
    try:
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temp_files(out)
            recover_stale_backups(out)
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
            os.close(fd)
            temps.append(Path(name))
        yield temps
        for tmp in temps:
            os.chmod(tmp, mode & ~current_umask())
        commit(list(zip(temps, outs)))
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def commit(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Rename each ``(temp, out)`` pair into place, all or none (the old files set aside, then put back on a
    failure); a failure is a KdcodeError naming the ``out`` that failed."""
    for _, out in pairs:  # a folder would be set aside whole and never deleted: refuse it before anything moves
        if out.is_dir() and not out.is_symlink():
            raise KdcodeError(f"{out} is a folder, where the export writes a file: move it away or choose another "
                              "--out")
    set_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    current = pairs[0][1] if pairs else None
    try:
        for _, out in pairs:
            current = out
            if out.exists() or out.is_symlink():
                os.replace(out, _backup(out))
                set_aside.append((_backup(out), out))
        for tmp, out in pairs:
            current = out
            os.replace(tmp, out)
            placed.append(out)
    except BaseException as exc:
        _roll_back(placed, set_aside)
        if isinstance(exc, Exception) and not isinstance(exc, KdcodeError):
            raise write_error(exc, current) from exc
        raise
    for backup, _ in set_aside:
        backup.unlink(missing_ok=True)


def _roll_back(placed: list[Path], set_aside: list[tuple[Path, Path]]) -> None:
    """Remove the new files moved in and put the old ones back, each as far as it goes (a file that cannot be put
    back stays set aside, where the next run writing its name puts it back)."""
    for path in placed:
        with suppress(OSError):
            path.unlink(missing_ok=True)
    for backup, out in reversed(set_aside):
        with suppress(OSError):
            os.replace(backup, out)


def sidecar_path(gguf: Path) -> Path:
    """The manifest kdcode writes beside a GGUF file."""
    return gguf.with_name(gguf.name.removesuffix(".gguf") + ".kdcode.json")


def modelfile_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name.removesuffix(".gguf") + ".Modelfile")
