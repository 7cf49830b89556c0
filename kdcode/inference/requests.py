"""The server's requests, validated without a server: a body's bytes in, a typed request or a
:class:`RequestError` (HTTP status, one-line message, the parameter at fault, an OpenAI error code) out, and
the :class:`Job` every endpoint shape comes down to (prompts, an optional suffix, how many tokens, stops).

Shapes: OpenAI's completions (``POST /v1/completions``, strict: unknown fields are refused, as OpenAI refuses
them), llama.cpp's ``POST /completion`` and ``POST /infill``, and Ollama's ``POST /api/generate``. The
llama.cpp and Ollama shapes ignore fields they do not use (sampling knobs such as ``top_k``, ``top_p``,
penalties, ``samplers``, ``cache_prompt``, timing limits, ``n_indent``, ``input_extra``, ``keep_alive``), as
those servers ignore unknown ones: their editor clients send them on every request. Their ``n_predict`` /
``num_predict`` is capped at the server's limit rather than refused (-1, "no limit", means the limit),
as llama.cpp caps it.

Everything a client sends is checked before any of it reaches the model: the body's size, that it is UTF-8,
how deeply its JSON nests (counted before it is parsed, so that a body nested 100,000 deep is refused and
not recursed into), that it is standard JSON (no ``NaN``), every field's type and range (integers that
torch can hold, finite floats, text that can be encoded as UTF-8: no lone surrogates such as ``"\\ud800"``),
and the server's own limits. Imports neither FastAPI nor torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; OpenAI's are int64


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the parameter at fault, an OpenAI error code, and the
    seconds to wait before asking again (``Retry-After``, for a 503)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self, shape: str = "openai") -> dict[str, Any]:
        """The error in the shape of the endpoint's API: OpenAI's (``{"error": {"message", "type", "param",
        "code"}}``), llama.cpp's (``{"error": {"code": status, "message", "type"}}``) or Ollama's
        (``{"error": message}``). A 503 is llama.cpp's ``unavailable_error``."""
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
        if shape == "ollama":
            return {"error": _printable(self.message)}
        if shape == "llama":
            type_ = "unavailable_error" if self.status == 503 else type_
            return {"error": {"code": self.status, "message": _printable(self.message), "type": type_}}
        return error_body(self.message, type_, self.param, self.code)


def _printable(text: str | None) -> str | None:
    """``text`` with anything UTF-8 cannot encode (a lone surrogate) escaped, so that an error can quote it."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(text: str, limit: int = 60) -> str:
    """A client's text (a key, a model name) as an error message quotes it: on one line, control characters
    and lone surrogates escaped, cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 1] + "…"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": type_, "param": _printable(param), "code": code}}


class Limits(BaseModel):
    """What one request may ask of the server."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_body_bytes: int = Field(2**20, ge=1)
    body_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)  # to receive the whole body (else 408)
    max_depth: int = Field(16, ge=2)  # JSON nesting: a completion request needs 2 ({"prompt": [...]})
    max_tokens: int = Field(128, ge=1)
    max_choices: int = Field(16, ge=1)  # prompts x n: one request cannot hold the model's queue for long
    max_beams: int = Field(16, ge=1)
    max_stop_strings: int = Field(16, ge=1)  # OpenAI allows 4; Continue's FIM templates send 7
    max_context_chars: int = Field(65_536, ge=1)  # an infill's prefix and suffix, each (the window is cut from them)


def _not_utf8(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (None when it can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode text: a lone surrogate at character {exc.start}"
    return None


def _utf8(text: str) -> str:
    if (why := _not_utf8(text)) is not None:
        raise PydanticCustomError("unicode", why)
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completions request; unknown fields are refused, as OpenAI refuses them. ``model`` may be left out
    (or null): the served model answers, as llama.cpp's and vLLM's servers default it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: Text | None = None
    prompt: Text | list[Text]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: Text | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Text, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: Text | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> tuple[str, ...] | None:
        """The stop strings asked for (None: the server's default, the end of the line)."""
        return None if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# -------------------------------------------------------------------------------------------------- JSON
# A JSON string, or an unterminated one up to the end: every '"' starts a match, so the scan is linear.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")  # the bytes that are not brackets
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def json_depth(body: bytes) -> int:
    """How deeply the JSON text ``body`` nests (brackets inside strings do not count), without parsing it:
    linear in its length, in C loops."""
    brackets = _STRING.sub(b"", body).translate(None, _BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(body: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object a request body holds (any endpoint shape), or a 4xx :class:`RequestError`."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"the request body is over {limits.max_body_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if json_depth(body) > limits.max_depth:
        raise RequestError(400, f"the request body nests JSON more than {limits.max_depth} deep")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: unreachable after the depth check
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    _check_text(data)
    return data


def _check_text(value: Any, path: tuple[str | int, ...] = ()) -> None:
    """Every string in a parsed body, keys too, encodes as UTF-8 (JSON's ``"\\ud800"`` escape gives one that
    does not); the depth check bounds the recursion."""
    if isinstance(value, str):
        if (why := _not_utf8(value)) is not None:
            where = _dotted(path)
            raise RequestError(400, f"{where}: {why}" if where else why, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, (*path, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            if (why := _not_utf8(key)) is not None:
                where = _dotted(path)
                raise RequestError(400, f"a key in {where or 'the request'} is {why}", where)
            _check_text(item, (*path, key))


def _dotted(path: Sequence[str | int]) -> str | None:
    """A location in the body as the error names it: ``prompt.1``, ``stream_options.x``."""
    return ".".join(shown(str(x)) for x in path) or None


def _unsupported(req: CompletionRequest) -> tuple[str, str] | None:
    if req.echo:
        return "echo", "echo is not supported"
    if req.logprobs:
        return "logprobs", "logprobs are not supported"
    if req.presence_penalty or req.frequency_penalty:
        return "presence_penalty", "presence_penalty and frequency_penalty are not supported (use 0)"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if req.top_p != 1.0:
        return "top_p", "top_p is not supported (use 1; temperature sets the sampling)"
    return None


def _validation_error(exc: ValidationError) -> RequestError:
    first = exc.errors(include_url=False, include_input=False)[0]
    # the field, then indices and keys; without the names pydantic gives the members of a union ("list[str]")
    loc = first["loc"][:1] + tuple(x for x in first["loc"][1:] if isinstance(x, int) or "[" not in x)
    param = _dotted(loc)
    return RequestError(400, f"{param}: {first['msg']}" if param else first["msg"], param)


def parse_completion_request(body: bytes, limits: Limits, models: Sequence[str] = ()) -> CompletionRequest:
    """A ``POST /v1/completions`` body as a request this server can serve, or a 4xx :class:`RequestError`.
    ``models``: the names the server answers to (its own first); empty: any; no ``model``: the server's own."""
    data = parse_json_body(body, limits)
    if isinstance(data.get("prompt"), list) and any(not isinstance(p, str) for p in data["prompt"]):
        raise RequestError(400, "prompt must be a string or a list of strings (token ids are not supported)", "prompt")
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if (bad := _unsupported(req)) is not None:
        raise RequestError(400, bad[1], bad[0])
    if models and req.model is not None and req.model not in models:
        raise RequestError(
            404, f"the model '{shown(req.model)}' does not exist; this server has {models[0]!r}", "model",
            "model_not_found",
        )
    if not req.prompts:
        raise RequestError(400, "prompt is an empty list", "prompt")
    if len(req.prompts) * req.n > limits.max_choices:
        raise RequestError(400, f"at most {limits.max_choices} completions per request (prompts x n)", "n")
    if req.max_tokens > limits.max_tokens:
        raise RequestError(
            400, f"max_tokens is {shown(str(req.max_tokens), 20)}; this server allows at most {limits.max_tokens}",
            "max_tokens",
        )
    _stops(req.stops, limits)
    if req.suffix:
        check_infill(max(req.prompts, key=len), req.suffix, limits)
    if req.best_of is not None and req.best_of > limits.max_beams:
        raise RequestError(400, f"best_of is at most {limits.max_beams} here", "best_of")
    if req.best_of is not None and req.best_of < req.n:
        raise RequestError(400, "best_of must be at least n", "best_of")
    if req.temperature > 0 and (req.best_of or 1) > 1:
        raise RequestError(400, "best_of > 1 is beam search here, which needs temperature 0", "best_of")
    return req


# -------------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """What a request asks of the model, whatever its shape: each prompt's ``n`` completions (beam search with
    ``beams`` > 1, sampling at ``temperature`` > 0), infilling when ``suffix`` is not None, ending at a ``stop``
    string (None: the end of the line) or after ``max_tokens`` (0: none are generated)."""

    prompts: tuple[str, ...]
    max_tokens: int
    suffix: str | None = None
    n: int = 1
    beams: int = 1
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stream: bool = False


def check_infill(prefix: str, suffix: str, limits: Limits, names: tuple[str, str] = ("prompt", "suffix")) -> None:
    """An infill's prefix and suffix within ``limits.max_context_chars`` each (a 400 naming the longer one)."""
    for text, name in zip((prefix, suffix), names):
        if len(text) > limits.max_context_chars:
            raise RequestError(
                400, f"{name} is {len(text)} characters; this server takes at most {limits.max_context_chars} "
                "(--max-context-chars; the model sees a window of it around the cursor)", name,
                "context_length_exceeded",
            )


def _stops(stop: str | Sequence[str] | None, limits: Limits, param: str = "stop") -> tuple[str, ...] | None:
    stops = None if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if stops is not None and (len(stops) > limits.max_stop_strings or any(not s for s in stops)):
        raise RequestError(400, f"{param} must be 1 to {limits.max_stop_strings} non-empty strings", param)
    return stops  # None: the end of the line; () (an empty list): no stop string, the completion runs on


def completion_job(req: CompletionRequest) -> Job:
    """The job of an OpenAI completions request (an empty ``suffix`` is no suffix, as OpenAI reads it)."""
    return Job(tuple(req.prompts), req.max_tokens, req.suffix or None, req.n, req.best_of or 1, req.temperature,
               req.seed, req.stops, req.stream)


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _capped(n: int | None, limits: Limits) -> int:
    """llama.cpp's n_predict / Ollama's num_predict: None or < 0 (no limit) is the server's limit, as is more."""
    return limits.max_tokens if n is None or n < 0 else min(n, limits.max_tokens)


Seed = Annotated[int, Field(ge=-1, le=2**64 - 1)]  # llama.cpp: -1 is a random seed; Tabby sends any u64


class _LlamaFields(BaseModel):
    """What llama.cpp's /completion and /infill share; greedy unless ``temperature`` > 0 (llama.cpp's default is
    0.8); other fields (sampling knobs, ``cache_prompt``, timing limits) are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    n_predict: int = Field(-1, ge=-2)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: Seed | None = None
    stop: list[Text] | None = None
    stream: bool = False
    response_fields: list[Text] | None = None  # the answer's fields to keep ("timings/prompt_n": one nested)

    def job(self, prompt: str, suffix: str | None, limits: Limits) -> Job:
        seed = None if self.seed is None or self.seed < 0 else self.seed
        return Job((prompt,), _capped(self.n_predict, limits), suffix, temperature=self.temperature, seed=seed,
                   stop=_stops(self.stop, limits), stream=self.stream)


class LlamaCompletionRequest(_LlamaFields):
    """llama.cpp's ``POST /completion`` (as Tabby's ``llama.cpp/completion`` backend sends it)."""

    prompt: Text


class LlamaInfillRequest(_LlamaFields):
    """llama.cpp's ``POST /infill`` (as llama.vim sends it): the code before the cursor's line, the text after the
    cursor, and ``prompt``, the cursor line's text before the cursor (it ends the prefix here).
    ``input_extra`` (other files' chunks) is accepted and not used: the model's window is the nearest code."""

    input_prefix: Text
    input_suffix: Text = ""
    input_extra: list[Any] | None = None
    prompt: Text = ""


def parse_llama_request(body: bytes, limits: Limits, infill: bool) -> tuple[_LlamaFields, Job]:
    """A ``POST /infill`` (``infill``) or ``POST /completion`` body: the request and its job, or a RequestError."""
    data = parse_json_body(body, limits)
    if not isinstance(data.get("prompt", ""), str):
        raise RequestError(400, "prompt must be a string (token ids are not supported)", "prompt")
    if infill:
        req = _parse(LlamaInfillRequest, data)
        check_infill(req.input_prefix + req.prompt, req.input_suffix, limits, ("input_prefix", "input_suffix"))
        return req, req.job(req.input_prefix + req.prompt, req.input_suffix, limits)
    req = _parse(LlamaCompletionRequest, data)
    return req, req.job(req.prompt, None, limits)


class OllamaOptions(BaseModel):
    """The Modelfile options of an Ollama request that apply here; the rest are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    num_predict: int | None = Field(None, ge=-2)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # Ollama's default is 0.8: greedy here unless asked
    seed: Seed | None = None
    stop: Text | list[Text] | None = None


class OllamaGenerateRequest(BaseModel):
    """Ollama's ``POST /api/generate``. ``stream`` defaults to true, as in Ollama; ``raw`` needs no template here
    (a prompt holding the model's FIM template is read as prefix and suffix either way)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: Text
    prompt: Text = ""
    suffix: Text | None = None
    stream: bool = True
    raw: bool = False
    format: Any = None
    images: list[Any] | None = None
    options: OllamaOptions = Field(default_factory=OllamaOptions)


def parse_ollama_request(body: bytes, limits: Limits) -> tuple[OllamaGenerateRequest, Job]:
    """A ``POST /api/generate`` body: the request and its job, or a RequestError (its message in Ollama's shape)."""
    req = _parse(OllamaGenerateRequest, parse_json_body(body, limits))
    if req.format not in (None, ""):
        raise RequestError(400, f"format {shown(json.dumps(req.format), 40)} is not supported (no structured "
                           "output here; leave it out)", "format")
    if req.images:
        raise RequestError(400, "images are not supported (a code model)", "images")
    suffix = req.suffix or None  # Ollama's templates treat an empty suffix as none
    if suffix is not None:
        check_infill(req.prompt, suffix, limits)
    o = req.options
    seed = None if o.seed is None or o.seed < 0 else o.seed
    job = Job((req.prompt,), _capped(o.num_predict, limits), suffix, temperature=o.temperature, seed=seed,
              stop=_stops(o.stop, limits, "options.stop"), stream=req.stream)
    return req, job
