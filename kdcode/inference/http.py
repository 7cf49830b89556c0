"""What the server's handlers share: the model's worker and the jobs it runs (:class:`ServerState`, :class:`Call`),
reading a body within the limits, errors in each API's shape, the 500 middleware, and the stream of text
deltas a streaming answer is made of (:meth:`Call.events`). The handlers themselves, one per endpoint shape, are
in :mod:`kdcode.inference.server`.

All model work runs on one worker thread (:mod:`kdcode.inference.worker`), so concurrent requests queue in
arrival order, at most ``max_waiting`` of them (then 503 with ``Retry-After``); the event loop stays free to
answer ``/health`` and to stream. From the moment a request is queued its client is watched: one that leaves
(closes its connection) cancels its job, which is then never run if it was waiting, or stops before its next
model pass if it was running, streamed or not.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdcode.errors import KdcodeError
from kdcode.inference.engine import DEFAULT_STOP, Choice, Completion, Engine
from kdcode.inference.infill import split_prompt
from kdcode.inference.requests import Job, Limits, RequestError, check_infill, error_body
from kdcode.inference.worker import DROPPED, Ticket, Worker

log = logging.getLogger("kdcode.serve")
OnText = Callable[[int, str], None]
RETRY_AFTER_S = 1  # what a 503 tells a client to wait: an editor asks again at its next keystroke anyway


def error_response(exc: RequestError, shape: str = "openai") -> JSONResponse:
    # A body that was not read to its end leaves the connection out of step: close it after the answer.
    headers = {"Connection": "close"} if exc.status in (408, 413) else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(exc.body(shape), status_code=exc.status, headers=headers or None)


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 in OpenAI's error shape, logged here, and goes
    no further. (Starlette's own handler re-raises after answering, and uvicorn then drops the connection,
    which reset the client's next keep-alive request.) A response already under way cannot be answered
    again: its connection is closed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = error_body(f"internal error: {type(exc).__name__}", "server_error")
            await JSONResponse(body, status_code=500)(scope, receive, send)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's body, at most ``limits.max_body_bytes`` (413), arriving within ``limits.body_timeout_s``
    (408): a client that announces a length and sends less cannot hold a connection open."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body_bytes:  # refused before it is read
        raise RequestError(413, f"the request body is over {limits.max_body_bytes} bytes")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"the request body is over {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before sending the whole body") from None


@dataclass(frozen=True)
class Part:
    """One prompt of a job as the model gets it: the prefix, the suffix (None: plain completion), its tokens."""

    prefix: str
    suffix: str | None
    tokens: int | None  # counted (plain prompts); an infill's window is counted when it is built


@dataclass
class ServerState:
    """What every handler shares: the engine, its worker, the model's name, the limits."""

    engine: Engine
    name: str  # the model's name in every answer, whatever name the request gave (one model per server)
    limits: Limits
    prompt_limit: int  # tokens of a plain prompt
    max_waiting: int = 16  # requests queued behind the running one; one more is answered 503
    created: int = field(default_factory=lambda: int(time.time()))
    worker: Worker = field(init=False)

    def __post_init__(self) -> None:
        self.worker = Worker(self.max_waiting)

    async def start(self, request: Request, job: Job) -> Call:
        """Queue ``job`` (a 503 when ``max_waiting`` requests wait) and wait for its turn; return once its prompts
        are prepared (a 400 when they are refused) and it is being generated. The client is watched from now on."""
        loop = asyncio.get_running_loop()
        call = Call(self.worker, loop)

        def work(cancel: threading.Event) -> list[Completion]:
            parts = self.prepare(job)
            loop.call_soon_threadsafe(call.prepared.set_result, parts)
            return self.generate(job, parts, call.on_text if job.stream else None, cancel)

        submitted = self.worker.submit(work)
        if submitted is None:
            raise RequestError(503, f"the server is busy: {self.worker.waiting} requests are waiting for the model; "
                               f"retry in {RETRY_AFTER_S} s", code="server_busy", retry_after=RETRY_AFTER_S)
        call.ticket, call.future = submitted
        call.watch(request)
        try:
            await call.until_prepared()
        except BaseException:
            call.close()
            raise
        return call

    def prepare(self, job: Job) -> list[Part]:
        """The job's prompts as the model will get them (worker thread), or a 400. A suffix needs a model that
        infills; a prompt holding the model's own FIM template (Continue and Tabby build one) is read back as
        prefix and suffix; a plain prompt over ``prompt_limit`` tokens is refused."""
        fim = self.engine.fim
        if job.suffix is not None and fim is None:
            raise RequestError(
                400, f"the model {self.name} does not infill (its tokenizer has no FIM tokens); send no suffix",
                "suffix", "fim_not_supported",
            )
        parts = []
        for i, prompt in enumerate(job.prompts):
            found = split_prompt(prompt, fim) if fim is not None and job.suffix is None else None
            if job.suffix is not None or found is not None:
                prefix, suffix = found or (prompt, job.suffix)
                check_infill(prefix, suffix, self.limits)  # type: ignore[arg-type]
                parts.append(Part(prefix, suffix, None))
                continue
            k = self.engine.count_tokens(prompt)
            if k > self.prompt_limit:
                where = f"prompt {i}" if len(job.prompts) > 1 else "the prompt"
                raise RequestError(
                    400,
                    f"{where} has {k} tokens; this server accepts at most {self.prompt_limit} (--max-prompt-tokens)",
                    "prompt",
                    "context_length_exceeded",
                )
            parts.append(Part(prompt, None, k))
        return parts

    def generate(
        self, job: Job, parts: list[Part], on_text: OnText | None, cancel: threading.Event | None = None
    ) -> list[Completion]:
        """Every prompt's ``n`` completions (worker thread); choice ``i * n + j`` streams to ``on_text``. Once
        ``cancel`` is set no model pass starts (nor any later prompt)."""
        stop = DEFAULT_STOP if job.stop is None else job.stop
        out = []
        for i, part in enumerate(parts):
            if cancel is not None and cancel.is_set():
                break
            if job.max_tokens == 0:  # llama.vim sends n_predict 0 to hand over context: nothing to generate
                out.append(Completion([Choice("", 0, "length")] * job.n, part.tokens or 0, None, 0.0))
                continue
            emit = None if on_text is None else (lambda j, d, base=i * job.n: on_text(base + j, d))
            result = self.engine.complete(
                part.prefix, job.max_tokens, n=job.n, beams=job.beams, temperature=job.temperature, seed=job.seed,
                stop=stop, on_text=emit, prompt_tokens=part.tokens, suffix=part.suffix, cancel=cancel,
            )
            # beams may agree on fewer than n distinct texts (an empty line): repeat the last, n choices stay n
            result.choices += result.choices[-1:] * (job.n - len(result.choices))
            out.append(result)
        return out


GONE = "the client closed the request"  # 499, as nginx names it: nobody reads it


class Call:
    """One request's job on the worker, seen from the event loop: its prompts once prepared, its text deltas as they
    are generated (streaming), its completions. A task watches the client meanwhile: when it leaves, the job is
    cancelled (dropped while it waits, stopped at its next model pass while it runs)."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker, self.loop = worker, loop
        self.prepared: asyncio.Future[list[Part]] = loop.create_future()
        self.deltas: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self.ticket: Ticket
        self.future: asyncio.Future[Any]
        self.watcher: asyncio.Task[None] | None = None

    def watch(self, request: Request) -> None:
        async def gone() -> None:
            # The body has been read: what the connection says next is that it closed (or that the answer went).
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        self.watcher = asyncio.ensure_future(gone())

    def cancel(self) -> None:
        if not self.future.done():
            self.worker.cancel(self.ticket)

    def close(self) -> None:
        """The answer is over (sent, failed or abandoned): stop watching, and stop the job if it still runs."""
        self.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    def on_text(self, index: int, delta: str) -> None:  # worker thread, maybe before submit() has returned
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, (index, delta))

    async def until_prepared(self) -> list[Part]:
        """The job's prompts once the worker has prepared them; its error when it refused them; a 499 when the
        client left first."""
        await asyncio.wait([self.prepared, self.future], return_when=asyncio.FIRST_COMPLETED)
        if self.prepared.done():
            return self.prepared.result()
        if self.future.result() is DROPPED:  # raises the worker's error, a RequestError for a refused prompt
            raise RequestError(499, GONE)
        raise RuntimeError("the job ended without preparing its prompts")

    async def results(self) -> list[Completion]:
        """The job's completions (not streamed), a 400 for what the engine refuses, a 499 when the client left."""
        try:
            out = await self.future
        except KdcodeError as exc:
            raise RequestError(400, str(exc)) from None
        finally:
            self.close()
        if out is DROPPED or self.ticket.cancel.is_set():
            raise RequestError(499, GONE)
        return out  # type: ignore[no-any-return]

    async def events(self) -> AsyncIterator[Any]:
        """A streamed job: ``(choice index, text delta)`` tuples as the text is generated, then the list of
        completions, or the exception that ended it (a KdcodeError is the client's; anything else is logged)."""

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled():
                f.exception()  # retrieved here too, so that a stream the client left logs no stray warning
            self.deltas.put_nowait(None)

        self.future.add_done_callback(done)
        try:
            while (item := await self.deltas.get()) is not None:
                yield item
            exc = self.future.exception()
            if exc is not None and not isinstance(exc, KdcodeError):
                log.error("internal error while streaming", exc_info=exc)
            yield exc if exc is not None else self.future.result()
        finally:
            self.close()


def stream_error(exc: BaseException) -> RequestError:
    """An exception that ended a stream, as the error the stream's last event reports."""
    if isinstance(exc, KdcodeError):
        return RequestError(400, str(exc))
    return RequestError(500, f"internal error: {type(exc).__name__}")
