"""SIGTERM as an exception while a command runs: ``kill PID``, a job scheduler's stop or a container's shutdown
unwinds the command as Ctrl-C does, through its ``finally`` and ``except BaseException`` blocks (temp files and
folders removed, an overwritten set of files put back), to one line and exit 143, where Python's default would end
the process at once, silently, leaving its temp files behind."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command stands so that it unwinds as from Ctrl-C (temp files removed)."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (once: a second one waits for the cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
