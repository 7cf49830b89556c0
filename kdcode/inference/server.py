"""An OpenAI-compatible completion server over one local model (FastAPI + uvicorn: ``pip install 'kdcode[serve]'``).

``POST /v1/completions`` takes OpenAI's completions request (``model``, ``prompt`` as a string or a list of
strings, ``max_tokens``, ``temperature``, ``stop``, ``n``, ``best_of``, ``seed``, ``stream``,
``stream_options``) and answers in its response shape, or as server-sent events ending with ``data: [DONE]``.
Where this server differs: ``temperature`` defaults to 0 (greedy; OpenAI's default is 1), and with no ``stop``
a completion ends at the end of its line; at temperature 0, ``n`` > 1 gives the n best distinct beams of a
beam search (``best_of`` beams); penalties, ``logit_bias``, ``logprobs``, ``echo`` and ``suffix`` are refused
with a 400 rather than ignored. Errors are JSON in OpenAI's error shape.

All model work runs on one worker thread, so concurrent requests queue in arrival order and never use the
model (or the tokenizer, which is not thread-safe) at the same time; the event loop stays free to answer
``/health`` and to stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdcode.errors import KdcodeError
from kdcode.inference.engine import DEFAULT_STOP, Completion, Engine, load_engine

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_CHOICES = 16  # prompts x n per request: one request cannot hold the queue for long
MAX_BEAMS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completions request; unknown fields are refused, as OpenAI refuses them."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1, le=MAX_BEAMS)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the parameter at fault, an OpenAI error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(exc: RequestError) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status < 500 else "server_error"
    return JSONResponse(error_body(exc.message, type_, exc.param, exc.code), status_code=exc.status)


def _unsupported(req: CompletionRequest) -> tuple[str, str] | None:
    if req.echo:
        return "echo", "echo is not supported"
    if req.logprobs:
        return "logprobs", "logprobs are not supported"
    if req.suffix:
        return "suffix", "suffix (fill-in-the-middle) is not supported"
    if req.presence_penalty or req.frequency_penalty:
        return "presence_penalty", "presence_penalty and frequency_penalty are not supported (use 0)"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if req.top_p != 1.0:
        return "top_p", "top_p is not supported (use 1; temperature sets the sampling)"
    return None


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(
    model_dir: str,
    *,
    engine: Engine | None = None,
    model_name: str | None = None,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 128,
    max_body_bytes: int = 2**20,
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
    accepted = {name, model_dir}
    prompt_limit = max_prompt_tokens or engine.n_positions
    tokens_limit = min(max_tokens_limit, engine.n_positions - 1)
    if prompt_limit < 1 or tokens_limit < 1:
        raise KdcodeError("--max-prompt-tokens and --max-tokens-limit must be at least 1")
    created = int(time.time())
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcode-model")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kdcode", summary=f"OpenAI-compatible completions from {name}", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()[:1]), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "device": engine.device, "dtype": engine.dtype}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": name, "object": "model", "created": created, "owned_by": "kdcode"}
        return {"object": "list", "data": [model]}

    def parse(body: bytes) -> CompletionRequest:
        if len(body) > max_body_bytes:
            raise RequestError(413, f"the request body is over {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if isinstance(data.get("prompt"), list) and any(not isinstance(p, str) for p in data["prompt"]):
            raise RequestError(
                400, "prompt must be a string or a list of strings (token ids are not supported)", "prompt"
            )
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(x) for x in first["loc"]) or None
            raise RequestError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from exc
        if (bad := _unsupported(req)) is not None:
            raise RequestError(400, bad[1], bad[0])
        if req.model not in accepted:
            raise RequestError(
                404, f"the model {req.model!r} does not exist; this server has {name!r}", "model", "model_not_found"
            )
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise RequestError(400, "prompt is an empty list", "prompt")
        if len(prompts) * req.n > MAX_CHOICES:
            raise RequestError(400, f"at most {MAX_CHOICES} completions per request (prompts x n)", "n")
        if req.max_tokens > tokens_limit:
            raise RequestError(
                400, f"max_tokens is {req.max_tokens}; this server allows at most {tokens_limit}", "max_tokens"
            )
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if stops is not None and (len(stops) > MAX_STOP_STRINGS or any(not s for s in stops)):
            raise RequestError(400, f"stop must be 1 to {MAX_STOP_STRINGS} non-empty strings", "stop")
        if req.best_of is not None and req.best_of < req.n:
            raise RequestError(400, "best_of must be at least n", "best_of")
        if req.temperature > 0 and (req.best_of or 1) > 1:
            raise RequestError(400, "best_of > 1 is beam search here, which needs temperature 0", "best_of")
        return req

    def check_lengths(prompts: list[str]) -> list[int]:
        counts = [engine.count_tokens(p) for p in prompts]
        for i, k in enumerate(counts):
            if k > prompt_limit:
                where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise RequestError(
                    400,
                    f"{where} has {k} tokens; this server accepts at most {prompt_limit} (--max-prompt-tokens)",
                    "prompt",
                    "context_length_exceeded",
                )
        return counts

    def generate(
        req: CompletionRequest, counts: list[int], on_text: Callable[[int, str], None] | None
    ) -> list[Completion]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stop = DEFAULT_STOP if req.stop is None else ([req.stop] if isinstance(req.stop, str) else req.stop)
        out = []
        for i, prompt in enumerate(prompts):
            emit = None if on_text is None else (lambda j, d, base=i * req.n: on_text(base + j, d))
            out.append(
                engine.complete(
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
            )
            # beams may agree on fewer than n distinct texts (an empty line): repeat the last, n choices stay n
            out[-1].choices += out[-1].choices[-1:] * (req.n - len(out[-1].choices))
        return out

    def usage(results: list[Completion]) -> dict[str, int]:
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(c.tokens for r in results for c in r.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def on_worker(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(worker, fn, *args)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        loop = asyncio.get_running_loop()
        try:
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_body_bytes:  # refused before it is read
                raise RequestError(413, f"the request body is over {max_body_bytes} bytes")
            req = parse(await request.body())
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            counts = await on_worker(loop, check_lengths, prompts)
        except RequestError as exc:
            return _error_response(exc)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
        }
        if not req.stream:
            try:
                results = await on_worker(loop, generate, req, counts, None)
            except KdcodeError as exc:
                return _error_response(RequestError(400, str(exc)))
            choices = [
                {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(c for r in results for c in r.choices)
            ]
            return JSONResponse({**head, "choices": choices, "usage": usage(results)})
        return StreamingResponse(
            _stream(loop, req, counts, head), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _stream(
        loop: asyncio.AbstractEventLoop, req: CompletionRequest, counts: list[int], head: dict[str, Any]
    ) -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        gone = threading.Event()

        def on_text(index: int, delta: str) -> None:
            if gone.is_set():  # the client left: stop generating for it
                raise ConnectionAbortedError("client disconnected")
            loop.call_soon_threadsafe(queue.put_nowait, (index, delta))

        future = on_worker(loop, generate, req, counts, on_text)

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
                message = str(exc) if isinstance(exc, KdcodeError) else f"internal error: {type(exc).__name__}"
                yield _sse(
                    error_body(message, "invalid_request_error" if isinstance(exc, KdcodeError) else "server_error")
                )
            else:
                results = future.result()
                for i, c in enumerate(c for r in results for c in r.choices):
                    choice = {"text": "", "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                    yield _sse({**head, "choices": [choice]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(results)})
            yield _sse("[DONE]")
        finally:
            gone.set()

    return app
