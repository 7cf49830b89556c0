"""Progress for long work: a rich bar with ETA and the current loss (or any short status) on a terminal; when
stderr is not a terminal (CI, nohup, a pipe), a plain line every ~30 s with the count, rate and ETA instead."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 30.0


def stderr_console() -> Console:
    """stderr, printing text as it is: a task named after a model path holding ``[/b]`` is not read as markup."""
    return Console(stderr=True, markup=False, highlight=False)


class PlainLogProgress(Progress):
    """A rich Progress that, when its console is not a terminal, prints a plain line every ``plain_every`` s."""

    def __init__(self, *columns: Any, plain_every: float | None = None, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.plain_every = plain_every
        self._last_plain: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self.plain_every is None or self.disable or self.console.is_terminal:
            return
        now = time.monotonic()
        last = self._last_plain.setdefault(task_id, now)
        if now - last < self.plain_every:
            return
        self._last_plain[task_id] = now
        task = self._tasks[task_id]
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        total = f"/{task.total:.0f}" if task.total else ""
        eta = f", eta {task.time_remaining:.0f} s" if task.time_remaining is not None else ""
        info = task.fields.get("info") or ""
        self.console.print(f"{task.description}: {task.completed:.0f}{total} ({rate:.2f}/s{eta}) {info}".rstrip(),
                           highlight=False)


def make_progress(console: Console | None = None, disable: bool = False, plain: bool = True) -> Progress:
    """A progress bar; ``plain`` prints a line every ``PLAIN_EVERY_S`` seconds when not on a terminal."""
    return PlainLogProgress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta", markup=False),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        console=console or stderr_console(),
        disable=disable,
        plain_every=PLAIN_EVERY_S if plain else None,
    )
