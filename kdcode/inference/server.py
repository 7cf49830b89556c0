"""An OpenAI-compatible completion server over one local model (FastAPI + uvicorn: ``pip install 'kdcode[serve]'``).

``POST /v1/completions`` takes OpenAI's completions request (``model``, ``prompt`` as a string or a list of
strings, ``max_tokens``, ``temperature``, ``stop``, ``n``, ``best_of``, ``seed``, ``stream``,
``stream_options``) and answers in its response shape, or as server-sent events ending with ``data: [DONE]``.
Where this server differs: ``temperature`` defaults to 0 (greedy; OpenAI's default is 1), and with no ``stop``
a completion ends at the end of its line; at temperature 0, ``n`` > 1 gives the n best distinct beams of a
beam search (``best_of`` beams); penalties, ``logit_bias``, ``logprobs``, ``echo`` and ``suffix`` are refused
with a 400 rather than ignored. Errors are JSON in OpenAI's error shape.

Requests are validated in :mod:`kdcode.inference.requests` before anything reaches the model; a client's
mistake is a 4xx, never a 500. A body that does not arrive within ``body_timeout_s`` is answered 408 and its
connection closed. An internal error is a 500 that leaves the connection and the server as they were.

All model work runs on one worker thread, so concurrent requests queue in arrival order and never use the
model (or the tokenizer, which is not thread-safe) at the same time; the event loop stays free to answer
``/health`` and to stream. Each endpoint shape is one handler over the shared :class:`ServerState`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kdcode.errors import KdcodeError
from kdcode.inference.engine import DEFAULT_STOP, Completion, Engine, load_engine
from kdcode.inference.requests import CompletionRequest, Limits, RequestError, error_body, parse_completion_request

log = logging.getLogger("kdcode.serve")
OnText = Callable[[int, str], None]


def error_response(exc: RequestError) -> JSONResponse:
    # A body that was not read to its end leaves the connection out of step: close it after the answer.
    headers = {"Connection": "close"} if exc.status in (408, 413) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


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


@dataclass
class ServerState:
    """What every handler shares: the engine, its one worker thread, the names it answers to, the limits."""

    engine: Engine
    name: str
    aliases: tuple[str, ...]  # the names a request may give the model: its own first
    limits: Limits
    prompt_limit: int  # tokens
    created: int = field(default_factory=lambda: int(time.time()))
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcode-model")
    )

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the model's worker thread, after the calls queued before it."""
        return asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def count_prompts(self, prompts: list[str]) -> list[int]:
        """Token counts of the prompts (worker thread), or a 400 for one over ``prompt_limit``."""
        counts = [self.engine.count_tokens(p) for p in prompts]
        for i, k in enumerate(counts):
            if k > self.prompt_limit:
                where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise RequestError(
                    400,
                    f"{where} has {k} tokens; this server accepts at most {self.prompt_limit} (--max-prompt-tokens)",
                    "prompt",
                    "context_length_exceeded",
                )
        return counts

    def generate(self, req: CompletionRequest, counts: list[int], on_text: OnText | None) -> list[Completion]:
        """Every prompt's ``n`` completions (worker thread); choice ``i * n + j`` streams to ``on_text``."""
        stop = DEFAULT_STOP if req.stops is None else req.stops
        out = []
        for i, prompt in enumerate(req.prompts):
            emit = None if on_text is None else (lambda j, d, base=i * req.n: on_text(base + j, d))
            result = self.engine.complete(
                prompt,
                req.max_tokens,
                n=req.n,
                beams=req.best_of or 1,
                temperature=req.temperature,
                seed=req.seed,
                stop=stop,
                on_text=emit,
                prompt_tokens=counts[i],
            )
            # beams may agree on fewer than n distinct texts (an empty line): repeat the last, n choices stay n
            result.choices += result.choices[-1:] * (req.n - len(result.choices))
            out.append(result)
        return out


def _usage(results: list[Completion]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(c.tokens for r in results for c in r.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_completions(state: ServerState) -> Callable[[Request], Any]:
    """The handler of OpenAI's ``POST /v1/completions``."""

    async def completions(request: Request) -> Response:
        try:
            req = parse_completion_request(await read_body(request, state.limits), state.limits, state.aliases)
            counts = await state.run(state.count_prompts, req.prompts)
        except RequestError as exc:
            return error_response(exc)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": state.name}
        if req.stream:
            return StreamingResponse(
                _stream(state, req, counts, head), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            results = await state.run(state.generate, req, counts, None)
        except KdcodeError as exc:
            return error_response(RequestError(400, str(exc)))
        choices = [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(c for r in results for c in r.choices)
        ]
        return JSONResponse({**head, "choices": choices, "usage": _usage(results)})

    return completions


async def _stream(
    state: ServerState, req: CompletionRequest, counts: list[int], head: dict[str, Any]
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    gone = threading.Event()

    def on_text(index: int, delta: str) -> None:
        if gone.is_set():  # the client left: stop generating for it
            raise ConnectionAbortedError("client disconnected")
        loop.call_soon_threadsafe(queue.put_nowait, (index, delta))

    future = state.run(state.generate, req, counts, on_text)

    def done(f: asyncio.Future[Any]) -> None:
        if not f.cancelled():
            f.exception()  # retrieved here too, so that a stream the client left logs no stray warning
        queue.put_nowait(None)

    future.add_done_callback(done)
    try:
        while (item := await queue.get()) is not None:
            choice = {"text": item[1], "index": item[0], "logprobs": None, "finish_reason": None}
            yield _sse({**head, "choices": [choice]})
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, KdcodeError):
                log.error("internal error while streaming", exc_info=exc)
            message = str(exc) if isinstance(exc, KdcodeError) else f"internal error: {type(exc).__name__}"
            yield _sse(error_body(message, "invalid_request_error" if isinstance(exc, KdcodeError) else "server_error"))
        else:
            results = future.result()
            for i, c in enumerate(c for r in results for c in r.choices):
                choice = {"text": "", "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                yield _sse({**head, "choices": [choice]})
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(results)})
        yield _sse("[DONE]")
    finally:
        gone.set()


def create_app(
    model_dir: str,
    *,
    engine: Engine | None = None,
    model_name: str | None = None,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 128,
    max_body_bytes: int = 2**20,
    body_timeout_s: float = 10.0,
    threads: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    verify: bool = True,
) -> FastAPI:
    """A FastAPI app serving ``model_dir`` (a folder, ``bundled`` or a hub id; or an already loaded ``engine``).

    ``max_prompt_tokens`` (default: the model's context) refuses longer prompts with a 400; a prompt within it
    but longer than the context left after ``max_tokens`` is cut to its last tokens, as in ``kdcode eval``.
    """
    engine = engine or load_engine(model_dir, device=device, dtype=dtype, threads=threads, verify=verify)
    name = model_name or (Path(model_dir).name if model_dir != "bundled" and Path(model_dir).exists() else model_dir)
    prompt_limit = max_prompt_tokens or engine.n_positions
    tokens_limit = min(max_tokens_limit, engine.n_positions - 1)
    if prompt_limit < 1 or tokens_limit < 1:
        raise KdcodeError("--max-prompt-tokens and --max-tokens-limit must be at least 1")
    try:
        limits = Limits(max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s, max_tokens=tokens_limit)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise KdcodeError(f"server limit {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    state = ServerState(engine, name, (name, model_dir), limits, prompt_limit)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kdcode", summary=f"OpenAI-compatible completions from {name}", lifespan=lifespan)
    app.state.engine = engine
    app.state.server = state
    app.add_middleware(InternalErrors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()[:1]), "invalid_request_error"), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "device": engine.device, "dtype": engine.dtype}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": name, "object": "model", "created": state.created, "owned_by": "kdcode"}
        return {"object": "list", "data": [model]}

    app.post("/v1/completions", response_model=None)(openai_completions(state))
    return app
