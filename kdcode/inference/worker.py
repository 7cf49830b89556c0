"""The model's one worker thread and the requests waiting for it.

Every model call runs on one thread, in arrival order, so that concurrent requests never use the model (or the
tokenizer, which is not thread-safe) at the same time. At most ``max_waiting`` requests wait: one more is refused
at once (the server answers 503) rather than queued behind work its client will have given up on. Each request
holds a :class:`Ticket` whose ``cancel`` event its transport sets when the client leaves: a waiting request is then
dropped without running, and a running one stops before its next model pass (the decoding loops look at the
event). Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

WAITING, RUNNING, DONE = "waiting", "running", "done"


class Ticket:
    """One request's place: waiting, running or done; ``cancel`` is set once its client has left."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.state = WAITING


class Dropped:
    """What a request's call returns when its client left before its turn: nothing was run."""


DROPPED = Dropped()


class Worker:
    """One thread for the model, and a bounded count of the requests waiting for it."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be at least 0, not {max_waiting}")
        self.max_waiting = max_waiting
        self.waiting = 0  # requests admitted whose turn has not come
        self.dropped = 0  # requests whose client left before their turn (never run)
        self.current: Ticket | None = None  # the request the model is working for
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcode-model")

    def submit(self, fn: Callable[[threading.Event], Any]) -> tuple[Ticket, asyncio.Future[Any]] | None:
        """``fn(cancel)`` on the worker thread once the calls before it are done, or None when ``max_waiting``
        requests already wait (with one running, a request waits even when none is queued). The future's result
        is fn's, or :data:`DROPPED` when the ticket was cancelled before its turn."""
        with self._lock:
            busy = self.current is not None or self.waiting > 0
            if busy and self.waiting >= self.max_waiting:
                return None
            ticket = Ticket()
            self.waiting += 1

        def call() -> Any:
            with self._lock:
                if ticket.state != WAITING:
                    return DROPPED
                ticket.state, self.current = RUNNING, ticket
                self.waiting -= 1
            try:
                return fn(ticket.cancel)
            finally:
                with self._lock:
                    ticket.state, self.current = DONE, None

        return ticket, asyncio.get_running_loop().run_in_executor(self._pool, call)

    def cancel(self, ticket: Ticket) -> None:
        """The ticket's client has left: drop it if it waits, stop it at its next model pass if it runs."""
        with self._lock:
            ticket.cancel.set()
            if ticket.state == WAITING:
                ticket.state = DONE
                self.waiting -= 1
                self.dropped += 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
