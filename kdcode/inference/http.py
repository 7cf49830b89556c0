"""What the server's handlers share: the model's one worker thread and the jobs it runs (:class:`ServerState`),
reading a body within the limits, errors in each API's shape, the 500 middleware, and the stream of text
deltas a streaming answer is made of (:func:`events`). The handlers themselves, one per endpoint shape, are
in :mod:`kdcode.inference.server`.

All model work runs on one worker thread, so concurrent requests queue in arrival order and never use the
model (or the tokenizer, which is not thread-safe) at the same time; the event loop stays free to answer
``/health`` and to stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdcode.errors import KdcodeError
from kdcode.inference.engine import DEFAULT_STOP, Choice, Completion, Engine
from kdcode.inference.requests import Job, Limits, RequestError, check_infill, error_body

log = logging.getLogger("kdcode.serve")
OnText = Callable[[int, str], None]


def error_response(exc: RequestError, shape: str = "openai") -> JSONResponse:
    # A body that was not read to its end leaves the connection out of step: close it after the answer.
    headers = {"Connection": "close"} if exc.status in (408, 413) else None
    return JSONResponse(exc.body(shape), status_code=exc.status, headers=headers)


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
    """What every handler shares: the engine, its one worker thread, the model's name, the limits."""

    engine: Engine
    name: str  # the model's name in every answer, whatever name the request gave (one model per server)
    limits: Limits
    prompt_limit: int  # tokens of a plain prompt
    created: int = field(default_factory=lambda: int(time.time()))
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcode-model")
    )

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the model's worker thread, after the calls queued before it."""
        return asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def prepare(self, job: Job) -> list[Part]:
        """The job's prompts as the model will get them (worker thread), or a 400. A suffix needs a model that
        infills; a prompt holding the model's own FIM template (Continue and Tabby build one) is read back as
        prefix and suffix; a plain prompt over ``prompt_limit`` tokens is refused."""
        from kdcode.fim import split_prompt

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

    def generate(self, job: Job, parts: list[Part], on_text: OnText | None) -> list[Completion]:
        """Every prompt's ``n`` completions (worker thread); choice ``i * n + j`` streams to ``on_text``."""
        stop = DEFAULT_STOP if job.stop is None else job.stop
        out = []
        for i, part in enumerate(parts):
            if job.max_tokens == 0:  # llama.vim sends n_predict 0 to hand over context: nothing to generate
                out.append(Completion([Choice("", 0, "length")] * job.n, part.tokens or 0, None, 0.0))
                continue
            emit = None if on_text is None else (lambda j, d, base=i * job.n: on_text(base + j, d))
            result = self.engine.complete(
                part.prefix, job.max_tokens, n=job.n, beams=job.beams, temperature=job.temperature, seed=job.seed,
                stop=stop, on_text=emit, prompt_tokens=part.tokens, suffix=part.suffix,
            )
            # beams may agree on fewer than n distinct texts (an empty line): repeat the last, n choices stay n
            result.choices += result.choices[-1:] * (job.n - len(result.choices))
            out.append(result)
        return out

    async def answer(self, job: Job, parts: list[Part]) -> list[Completion]:
        """The job's completions (not streamed), or a 400 for what the engine refuses."""
        try:
            return await self.run(self.generate, job, parts, None)
        except KdcodeError as exc:
            raise RequestError(400, str(exc)) from None


async def events(state: ServerState, job: Job, parts: list[Part]) -> AsyncIterator[Any]:
    """A streamed job: ``(choice index, text delta)`` tuples as the text is generated, then the list of
    completions, or the exception that ended it (a KdcodeError is the client's; anything else is logged). A
    client that leaves stops the generation at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    gone = threading.Event()

    def on_text(index: int, delta: str) -> None:
        if gone.is_set():  # the client left: stop generating for it
            raise ConnectionAbortedError("client disconnected")
        loop.call_soon_threadsafe(queue.put_nowait, (index, delta))

    future = state.run(state.generate, job, parts, on_text)

    def done(f: asyncio.Future[Any]) -> None:
        if not f.cancelled():
            f.exception()  # retrieved here too, so that a stream the client left logs no stray warning
        queue.put_nowait(None)

    future.add_done_callback(done)
    try:
        while (item := await queue.get()) is not None:
            yield item
        exc = future.exception()
        if exc is not None and not isinstance(exc, KdcodeError):
            log.error("internal error while streaming", exc_info=exc)
        yield exc if exc is not None else future.result()
    finally:
        gone.set()


def stream_error(exc: BaseException) -> RequestError:
    """An exception that ended a stream, as the error the stream's last event reports."""
    if isinstance(exc, KdcodeError):
        return RequestError(400, str(exc))
    return RequestError(500, f"internal error: {type(exc).__name__}")
