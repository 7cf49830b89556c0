"""The server's requests, validated without a server: a body's bytes in, a typed request or a
:class:`RequestError` (HTTP status, one-line message, the parameter at fault, an OpenAI error code) out.

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
from itertools import accumulate
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; OpenAI's are int64


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the parameter at fault, an OpenAI error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
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
    max_stop_strings: int = Field(4, ge=1)  # as OpenAI


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
    """OpenAI's completions request; unknown fields are refused, as OpenAI refuses them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: Text
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
    if req.suffix:
        return "suffix", "suffix (fill-in-the-middle) is not supported"
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
    ``models``: the names the server answers to (its own first); empty: any."""
    data = parse_json_body(body, limits)
    if isinstance(data.get("prompt"), list) and any(not isinstance(p, str) for p in data["prompt"]):
        raise RequestError(400, "prompt must be a string or a list of strings (token ids are not supported)", "prompt")
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if (bad := _unsupported(req)) is not None:
        raise RequestError(400, bad[1], bad[0])
    if models and req.model not in models:
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
    stops = req.stops
    if stops is not None and (len(stops) > limits.max_stop_strings or any(not s for s in stops)):
        raise RequestError(400, f"stop must be 1 to {limits.max_stop_strings} non-empty strings", "stop")
    if req.best_of is not None and req.best_of > limits.max_beams:
        raise RequestError(400, f"best_of is at most {limits.max_beams} here", "best_of")
    if req.best_of is not None and req.best_of < req.n:
        raise RequestError(400, "best_of must be at least n", "best_of")
    if req.temperature > 0 and (req.best_of or 1) > 1:
        raise RequestError(400, "best_of > 1 is beam search here, which needs temperature 0", "best_of")
    return req
