"""A completion server over one local model, in the shapes editors speak (FastAPI + uvicorn:
``pip install 'kdcode[serve]'``). One handler per endpoint shape:

- ``POST /v1/completions`` — OpenAI's completions (``model``, optional: the served one; ``prompt`` as a string
  or a list of strings, ``suffix``, ``max_tokens``, ``temperature``, ``stop``, ``n``, ``best_of``, ``seed``,
  ``stream``, ``stream_options``), answered in its response shape or as server-sent events ending with ``data: [DONE]``.
- ``POST /infill`` — llama.cpp server's infill (``input_prefix``, ``input_suffix``, ``prompt``: the cursor
  line's start, ``n_predict``, ``stream``, ``stop``; as llama.vim sends it) and ``POST /completion``,
  llama.cpp's native completion (``prompt``, ``n_predict``, ``temperature``, ``seed``, ``stream``; as Tabby's
  ``llama.cpp/completion`` backend sends it): ``{"content", "stop", "timings", ...}``, streamed as
  ``data: {"content": ..., "stop": false}`` events, the last one with ``"stop": true`` (no ``[DONE]``).
- ``POST /api/generate`` — Ollama's (``model``, ``prompt``, ``suffix``, ``stream``, default true, as
  newline-delimited JSON; ``options.num_predict``, ``options.temperature``, ``options.stop``).
- ``GET /v1/models`` and ``GET /api/tags`` list the model, ``POST /api/show`` describes it (Continue reads
  its ``template`` to decide whether to send ``suffix``), ``GET /health``.

One model per server: a request may name any model (editor plugins make users type one) and every answer
names the real one. With a suffix the model fills in the middle (it must have FIM tokens: a 400 otherwise);
a prompt that holds the model's own FIM template, as Continue and Tabby build it, is read back as prefix and
suffix, so that the server can cut a long one to the model's window around the cursor
(:mod:`kdcode.inference.infill`). Where this server differs from the APIs it imitates: ``temperature``
defaults to 0 (greedy), a completion ends at the end of its line unless ``stop`` says otherwise (``stop: []``:
no stop string), at temperature 0 OpenAI's ``n`` > 1 gives the n best distinct beams (``best_of`` beams);
OpenAI's penalties, ``logit_bias``, ``logprobs`` and ``echo`` are refused with a 400, the other shapes'
sampling knobs are ignored. Errors are JSON in each API's error shape; a client's mistake is a 4xx, never a
500; a body that does not arrive within ``body_timeout_s`` is answered 408 and its connection closed.

Requests queue for the model's one worker, at most ``max_queue`` of them (one more: 503 with ``Retry-After``,
in the endpoint's error shape; ``/health`` says how many wait). A client that closes its connection is not
generated for: dropped while it waits, stopped before the next model pass while it runs, on every endpoint,
streamed or not, with or without a draft. The model's KV cache (and the draft's) is kept from one request to the
next, so that a prompt that starts as the previous one did is prefilled only from where they differ (torch
backend; reported as ``usage.prompt_tokens_details.cached_tokens`` and llama.cpp's ``tokens_cached``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdcode.errors import KdcodeError
from kdcode.export.modelfile import template as ollama_template
from kdcode.inference.engine import DEFAULT_STOP, Completion, Engine, load_engine
from kdcode.inference.http import (
    Call,
    InternalErrors,
    ServerState,
    error_response,
    read_body,
    stream_error,
)
from kdcode.inference.requests import (
    Job,
    Limits,
    RequestError,
    completion_job,
    error_body,
    parse_completion_request,
    parse_llama_request,
    parse_ollama_request,
)
from kdcode.models.artifacts import utc_now
from kdcode.spec import build_spec
from kdcode.spec_serve import ServeSpec

SSE = {"media_type": "text/event-stream", "headers": {"Cache-Control": "no-cache"}}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ------------------------------------------------------------------------------------------- OpenAI
def _usage(results: list[Completion]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(c.tokens for r in results for c in r.choices)
    cached = sum(r.cached_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def openai_completions(state: ServerState) -> Callable[[Request], Any]:
    """The handler of OpenAI's ``POST /v1/completions``."""

    async def completions(request: Request) -> Response:
        try:
            req = parse_completion_request(await read_body(request, state.limits), state.limits)
            job = completion_job(req)
            call = await state.start(request, job)
            results = None if job.stream else await call.results()
        except RequestError as exc:
            return error_response(exc)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": state.name}
        if results is None:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_openai_stream(call, head, usage), **SSE)  # type: ignore[arg-type]
        choices = [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(c for r in results for c in r.choices)
        ]
        return JSONResponse({**head, "choices": choices, "usage": _usage(results)})

    return completions


async def _openai_stream(call: Call, head: dict[str, Any], usage: bool) -> AsyncIterator[str]:
    async for event in call.events():
        if isinstance(event, tuple):
            yield _sse({**head, "choices": [{"text": event[1], "index": event[0], "logprobs": None,
                                              "finish_reason": None}]})
        elif isinstance(event, BaseException):
            yield _sse(stream_error(event).body())
        else:
            for i, c in enumerate(c for r in event for c in r.choices):
                yield _sse({**head, "choices": [{"text": "", "index": i, "logprobs": None,
                                                  "finish_reason": c.finish_reason}]})
            if usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
    yield _sse("[DONE]")


# ------------------------------------------------------------------------------------------- llama.cpp
def _llama_body(state: ServerState, job: Job, result: Completion) -> dict[str, Any]:
    """llama.cpp's answer to /completion and /infill (its fields that have a meaning here)."""
    choice = result.choices[0]
    first = result.first_token_s or 0.0
    predict_s = max(result.total_s - first, 0.0)
    timings = {
        "prompt_n": result.prompt_tokens,
        "cache_n": result.cached_tokens,
        "prompt_ms": round(1000 * first, 3),
        "prompt_per_token_ms": round(1000 * first / max(result.prompt_tokens, 1), 3),
        "prompt_per_second": round(result.prompt_tokens / first, 1) if first else 0.0,
        "predicted_n": choice.tokens,
        "predicted_ms": round(1000 * predict_s, 3),
        "predicted_per_token_ms": round(1000 * predict_s / max(choice.tokens - 1, 1), 3),
        "predicted_per_second": round((choice.tokens - 1) / predict_s, 1) if predict_s else 0.0,
    }
    return {
        "content": choice.text, "index": 0, "id_slot": 0, "stop": True, "model": state.name,
        "tokens_predicted": choice.tokens, "tokens_evaluated": result.prompt_tokens,
        "tokens_cached": result.cached_tokens,
        "truncated": result.truncated, "stop_type": "limit" if choice.finish_reason == "length" else "eos",
        "stopping_word": "",
        "generation_settings": {"n_predict": job.max_tokens, "temperature": job.temperature, "seed": job.seed,
                                "stop": list(DEFAULT_STOP if job.stop is None else job.stop)},
        "timings": timings,
    }


def _fields(body: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: only those fields, a nested one named by its path ("timings/prompt_n")."""
    if not fields:
        return body
    out = {}
    for path in fields:
        node: Any = body
        for key in path.split("/"):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            out[path] = node
    return out


def llama_completion(state: ServerState, infill: bool) -> Callable[[Request], Any]:
    """The handler of llama.cpp's ``POST /infill`` (``infill``) and ``POST /completion``: one answer shape."""

    async def completion(request: Request) -> Response:
        try:
            req, job = parse_llama_request(await read_body(request, state.limits), state.limits, infill)
            call = await state.start(request, job)
            results = None if job.stream else await call.results()
        except RequestError as exc:
            return error_response(exc, "llama")
        if results is None:
            return StreamingResponse(_llama_stream(state, job, call, req.response_fields), **SSE)  # type: ignore[arg-type]
        return JSONResponse(_fields(_llama_body(state, job, results[0]), req.response_fields))

    return completion


async def _llama_stream(state: ServerState, job: Job, call: Call, fields: list[str] | None) -> AsyncIterator[str]:
    async for event in call.events():
        if isinstance(event, tuple):
            yield _sse({"content": event[1], "stop": False, "index": 0, "id_slot": 0})
        elif isinstance(event, BaseException):
            yield _sse(stream_error(event).body("llama"))
        else:
            yield _sse(_fields({**_llama_body(state, job, event[0]), "content": ""}, fields))


# ------------------------------------------------------------------------------------------- Ollama
_now = partial(utc_now, timespec="milliseconds", zulu=True)  # a time as Ollama writes one (UTC, milliseconds, Z)


def _ollama_done(result: Completion) -> dict[str, Any]:
    choice, first = result.choices[0], result.first_token_s or 0.0
    return {
        "done": True, "done_reason": "length" if choice.finish_reason == "length" else "stop", "context": [],
        "total_duration": int(result.total_s * 1e9), "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": int(first * 1e9),
        "eval_count": choice.tokens, "eval_duration": int(max(result.total_s - first, 0.0) * 1e9),
    }


def ollama_generate(state: ServerState) -> Callable[[Request], Any]:
    """The handler of Ollama's ``POST /api/generate``."""

    async def generate(request: Request) -> Response:
        try:
            req, job = parse_ollama_request(await read_body(request, state.limits), state.limits)
            if not req.prompt and job.suffix is None:  # Ollama loads the model and says so
                return JSONResponse({"model": state.name, "created_at": _now(), "response": "", "done": True,
                                     "done_reason": "load"})
            call = await state.start(request, job)
            results = None if job.stream else await call.results()
        except RequestError as exc:
            return error_response(exc, "ollama")
        if results is None:
            return StreamingResponse(_ollama_stream(state, call), media_type="application/x-ndjson")
        text = results[0].choices[0].text
        return JSONResponse({"model": state.name, "created_at": _now(), "response": text, **_ollama_done(results[0])})

    return generate


async def _ollama_stream(state: ServerState, call: Call) -> AsyncIterator[str]:
    async for event in call.events():
        if isinstance(event, tuple):
            line: dict[str, Any] = {"model": state.name, "created_at": _now(), "response": event[1], "done": False}
        elif isinstance(event, BaseException):
            line = stream_error(event).body("ollama")
        else:
            line = {"model": state.name, "created_at": _now(), "response": "", **_ollama_done(event[0])}
        yield json.dumps(line) + "\n"


FORMATS = {"onnxruntime": "onnx", "llama.cpp": "gguf"}  # the weights' format by backend; torch: safetensors


def _weight_files(engine: Engine) -> list[Path]:
    """The model's weight files on disk: a backend's own (model.onnx and its data, the .gguf), else the folder's
    safetensors."""
    files = getattr(engine.model, "files", None)  # kdcode.inference.backends.base.StepModel
    if files is None:
        folder = getattr(engine.loaded, "folder", None)
        files = sorted(Path(folder).glob("*.safetensors")) if folder else []
    return [Path(p) for p in files if Path(p).is_file()]


def _ollama_model(state: ServerState) -> dict[str, Any]:
    """The model as Ollama's /api/tags and /api/show describe one: its weight files' bytes, format and last
    change."""
    engine = state.engine
    loaded = engine.loaded
    files = _weight_files(engine)
    changed = max((p.stat().st_mtime for p in files), default=None)
    details = {"format": FORMATS.get(engine.runtime.get("backend", "torch"), "safetensors"),
               "family": getattr(engine.model.config, "model_type", ""),
               "parameter_size": f"{loaded.params / 1e6:.1f}M", "quantization_level": engine.dtype}
    return {"name": state.name, "model": state.name, "modified_at": _now(changed),
            "size": sum(p.stat().st_size for p in files), "digest": str(getattr(loaded, "fingerprint", "")),
            "details": details}


def ollama_show(state: ServerState) -> Callable[[Request], Any]:
    """The handler of Ollama's ``POST /api/show``: a template with ``.Suffix`` when the model infills (in the
    order it infills, PSM or SPM), which is how Continue decides to send prefix and suffix apart."""

    async def show(_: Request) -> dict[str, Any]:
        fim = state.engine.fim
        template = ollama_template(fim, state.engine.fim_order)  # as the Modelfile kdcode export writes
        model = _ollama_model(state)
        return {"modelfile": f"# served by kdcode\nFROM {state.name}\n", "parameters": "", "template": template,
                "details": model["details"], "modified_at": model["modified_at"],
                "model_info": {"general.architecture": model["details"]["family"],
                               "general.context_length": state.engine.n_positions},
                "capabilities": ["completion"] + (["insert"] if fim is not None else [])}

    return show


# ------------------------------------------------------------------------------------------- the app
def create_app(
    model_dir: str,
    *,
    engine: Engine | None = None,
    model_name: str | None = None,
    serve: ServeSpec | None = None,
    verify: bool = True,
    **settings: Any,
) -> FastAPI:
    """A FastAPI app serving ``model_dir`` (a folder, ``bundled`` or a hub id; or an already loaded ``engine``),
    with the settings of ``serve`` (:class:`kdcode.spec.ServeSpec`, or its fields as keywords).

    ``max_prompt_tokens`` (default: the model's context) refuses longer plain prompts with a 400; a prompt
    within it but longer than the context left after ``max_tokens`` is cut to its last tokens, as in ``kdcode
    eval``. An infill's prefix and suffix are cut to the model's window; over ``max_context_chars`` characters
    each, they are refused. ``fim_format`` names the model's FIM token family when detection would not find it.
    At most ``max_queue`` requests wait for the model behind the one it is working on; one more is answered 503
    with ``Retry-After``.
    """
    spec = serve or build_spec(ServeSpec, settings, "server settings")
    engine = engine or load_engine(model_dir, device=spec.device, dtype=spec.dtype, threads=spec.threads,
                                   verify=verify, fim_format=spec.fim_format, fim_order=spec.fim_order)
    name = model_name or (Path(model_dir).name if model_dir != "bundled" and Path(model_dir).exists() else model_dir)
    prompt_limit = spec.max_prompt_tokens or engine.n_positions
    tokens_limit = min(spec.max_tokens_limit, engine.n_positions - 1)
    if tokens_limit < 1:
        raise KdcodeError("--max-tokens-limit must be at least 1 and below the model's context")
    limits = Limits(max_body_bytes=spec.max_body_bytes, body_timeout_s=spec.body_timeout, max_tokens=tokens_limit,
                    max_context_chars=spec.max_context_chars)
    state = ServerState(engine, name, limits, prompt_limit, spec.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.worker.shutdown()

    app = FastAPI(title="kdcode", summary=f"code completions from {name}", lifespan=lifespan)
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
        return {"status": "ok", "model": name, "device": engine.device, "dtype": engine.dtype,
                "infill": engine.fim.name if engine.fim is not None else None,
                "waiting": state.worker.waiting, "max_waiting": state.worker.max_waiting,
                "busy": state.worker.current is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": name, "object": "model", "created": state.created, "owned_by": "kdcode"}
        return {"object": "list", "data": [model]}

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_ollama_model(state)]}

    app.post("/v1/completions", response_model=None)(openai_completions(state))
    app.post("/infill", response_model=None)(llama_completion(state, infill=True))
    app.post("/completion", response_model=None)(llama_completion(state, infill=False))
    app.post("/api/generate", response_model=None)(ollama_generate(state))
    app.post("/api/show", response_model=None)(ollama_show(state))
    return app
