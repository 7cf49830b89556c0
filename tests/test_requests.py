"""Request validation without a server: bodies in, typed requests or RequestError (status, message, param) out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcode.inference.requests import (
    MAX_SEED,
    CompletionRequest,
    Limits,
    RequestError,
    error_body,
    json_depth,
    parse_completion_request,
    parse_json_body,
)

LIMITS = Limits(max_tokens=32)
MODELS = ("tiny", "/models/tiny")


def parse(body: dict | bytes | str, limits: Limits = LIMITS) -> CompletionRequest:
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return parse_completion_request(raw, limits, MODELS)


def refused(body, limits: Limits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(body, limits)
    return info.value


def test_model_may_be_left_out_as_llama_cpp_and_vllm_allow():
    """OpenAI requires ``model``; llama.cpp's and vLLM's servers default it to the model they serve, and so
    does kdcode (the answer names the served model)."""
    assert parse({"prompt": "x"}).model is None
    assert parse({"model": None, "prompt": "x"}).model is None
    assert parse_completion_request(b'{"prompt": "x"}', LIMITS).model is None  # a server that answers to any name


def test_a_full_request_parses():
    req = parse({"model": "/models/tiny", "prompt": ["a", "b"], "max_tokens": 8, "n": 2, "stop": "\n\n",
                 "seed": MAX_SEED, "temperature": 0.5, "stream": True, "stream_options": {"include_usage": True}})
    assert req.prompts == ["a", "b"] and req.stops == ("\n\n",) and req.seed == MAX_SEED and req.n == 2
    req = parse({"model": "tiny", "prompt": "x"})
    assert req.prompts == ["x"] and req.stops is None and req.max_tokens == 16 and req.temperature == 0.0


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (b'{"model": "tiny", "prompt": "\xff"}', 400, None, "not valid UTF-8"),
        ('{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None, "NaN is not a JSON number"),
        ('{"model": "tiny", "prompt": "x", "temperature": -Infinity}', 400, None, "Infinity"),
        ('{"model": "tiny", "prompt": "x", "temperature": 1e999}', 400, "temperature", "finite"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}", 400, None, "not valid JSON"),
        ('{"model": "tiny", "prompt": "\\ud800"}', 400, "prompt", "lone surrogate at character 0"),
        ('{"model": "tiny", "prompt": ["ok", "a\\udc00"]}', 400, "prompt.1", "lone surrogate at character 1"),
        ('{"model": "tiny", "prompt": "x", "user": "\\udfff"}', 400, "user", "lone surrogate"),
        ('{"model": "tiny", "prompt": "x", "\\ud800": 1}', 400, None, "a key in the request"),
        ('{"model": "tiny", "prompt": "\\ud83d\\ude00"}', 200, None, ""),  # a surrogate pair is one character
        ({"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed", "less than or equal to 9223372036854775807"),
        ({"model": "tiny", "prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 10**4000}, 400, "max_tokens", "at most 32"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
        ({"model": "tiny", "prompt": [1, 2]}, 400, "prompt", "token ids"),
        ({"model": "tiny", "prompt": {"a": 1}}, 400, "prompt", "string"),
        ({"model": "tiny", "prompt": []}, 400, "prompt", "empty"),
        ({"model": 5, "prompt": "x"}, 400, "model", "valid string"),
        ({"model": "other", "prompt": "x"}, 404, "model", "does not exist; this server has 'tiny'"),
        ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "bogus", "Extra inputs"),
        ({"model": "tiny", "prompt": "x", "a\nb": 1}, 400, "a\\nb", "a\\nb: Extra inputs"),  # on one line
        ({"model": "x\n" * 1000, "prompt": "x"}, 404, "model", "'x\\nx\\n"),
        ({"model": "tiny", "prompt": "x", "stream_options": {"x": 1}}, 400, "stream_options.x", "Extra inputs"),
        ({"model": "tiny", "prompt": "x", "stop": list("abcdefghijklmnopq")}, 400, "stop", "1 to 16"),
        ({"model": "tiny", "prompt": "x", "stop": ""}, 400, "stop", "non-empty"),
        ({"model": "tiny", "prompt": ["x"] * 5, "n": 4}, 400, "n", "at most 16"),
        ({"model": "tiny", "prompt": "x", "best_of": 17}, 400, "best_of", "at most 16"),
        ({"model": "tiny", "prompt": "x", "best_of": 2, "n": 3}, 400, "best_of", "at least n"),
        ({"model": "tiny", "prompt": "x", "best_of": 2, "temperature": 1}, 400, "best_of", "temperature 0"),
        ({"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
        ({"model": "tiny", "prompt": "x", "top_p": 0.5}, 400, "top_p", "not supported"),
        ({"model": "tiny", "prompt": "x", "logprobs": 10**9}, 400, "logprobs", "less than or equal to 5"),
        ({"model": "tiny", "prompt": "x", "echo": True}, 400, "echo", "not supported"),
        ({"model": "tiny", "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", "not supported"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"1": 1e9}}, 400, "logit_bias.1", "less than or equal"),
    ],
)
def test_each_mistake_is_one_4xx_line(body, status, param, needle):
    if status == 200:
        assert parse(body).prompts
        return
    err = refused(body)
    assert (err.status, err.param) == (status, param) and needle in err.message, vars(err)
    assert "\n" not in err.message and len(err.message) < 200
    shape = err.body()["error"]
    assert shape["type"] == "invalid_request_error" and shape["message"] == err.message


def test_limits_are_the_servers():
    small = Limits(max_body_bytes=90, max_depth=3, max_tokens=4, max_choices=2, max_beams=2, max_stop_strings=1)
    assert refused({"model": "tiny", "prompt": "x" * 80}, small).status == 413
    assert refused({"model": "tiny", "prompt": [[["x"]]]}, small).message.endswith("more than 3 deep")
    assert refused({"model": "tiny", "prompt": "x", "max_tokens": 5}, small).param == "max_tokens"
    assert refused({"model": "tiny", "prompt": "x", "n": 3}, small).param == "n"
    assert refused({"model": "tiny", "prompt": "x", "max_tokens": 1, "best_of": 3}, small).param == "best_of"
    assert refused({"model": "tiny", "prompt": "x", "max_tokens": 1, "stop": ["a", "b"]}, small).param == "stop"
    assert parse({"model": "tiny", "prompt": ["x"], "max_tokens": 4, "n": 2, "best_of": 2}, small).n == 2
    with pytest.raises(ValueError):
        Limits(bogus=1)


def test_nesting_is_refused_before_it_is_parsed():
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = refused(deep)
    assert err.status == 400 and "more than 16 deep" in err.message
    # brackets inside strings are text, not nesting
    assert parse({"model": "tiny", "prompt": "[[[[" * 100 + '"\\' + "{" * 50}).prompts


def test_json_depth_of_hostile_bodies_is_linear():
    """Unterminated strings and runs of quotes or backslashes: one pass each (these would be quadratic for a
    string pattern that can fail and retry at every quote)."""
    for body in (b'"' + b'\\"' * 300_000, b'"' * 600_000, b'"\\' * 300_000, b"[" * 600_000, b"[]" * 300_000):
        assert json_depth(body) in (0, 1, 600_000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.sampled_from('ab"\\[]{}\n')),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(st.sampled_from('k"[\\{')), kids, max_size=3),
    max_leaves=20,
)


def nesting(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None, database=None)
@given(json_values, st.booleans())
def test_json_depth_is_the_nesting_of_the_parsed_value(value, indent):
    assert json_depth(json.dumps(value, indent=1 if indent else None).encode()) == nesting(value)


def test_error_bodies_escape_what_utf8_cannot_encode():
    body = error_body("bad \ud800", "invalid_request_error", "a\udc00")
    assert json.dumps(body, ensure_ascii=False).encode("utf-8")  # no UnicodeEncodeError
    assert body["error"]["message"] == "bad \\ud800" and body["error"]["param"] == "a\\udc00"


def test_parse_json_body_serves_any_endpoint_shape():
    assert parse_json_body(b'{"input_prefix": "def f(", "n_predict": 8}', LIMITS) == {
        "input_prefix": "def f(", "n_predict": 8
    }


def test_importable_without_fastapi_or_torch():
    code = ("import sys; import kdcode.inference.requests; "
            "bad = {'fastapi', 'starlette', 'torch'} & set(sys.modules); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ editor shapes (issue 21)
def test_editor_shapes_come_down_to_jobs():
    from kdcode.inference.requests import Job, completion_job, parse_llama_request, parse_ollama_request

    small = Limits(max_tokens=32, max_context_chars=100)
    raw = lambda body: json.dumps(body).encode()  # noqa: E731
    req, job = parse_llama_request(raw({"input_prefix": "a\n", "input_suffix": "\nb", "prompt": "  x", "n_predict": 256,
                                        "top_k": 40, "samplers": ["infill"], "seed": -1}), small, infill=True)
    assert job == Job(("a\n  x",), 32, "\nb") and req.input_extra is None  # capped, seed -1 is random
    _, job = parse_llama_request(raw({"prompt": "p", "seed": 2**64 - 1, "temperature": 0.1, "stream": True,
                                      "presence_penalty": 0.0, "penalty_last_n": 0}), small, infill=False)
    assert job == Job(("p",), 32, None, temperature=0.1, seed=2**64 - 1, stream=True)
    _, job = parse_ollama_request(raw({"model": "x", "prompt": "p", "suffix": "s", "options": {
        "num_predict": 5, "stop": ["\n\n"], "num_ctx": 4096, "top_p": 0.9}, "keep_alive": 1800}), small)
    assert job == Job(("p",), 5, "s", stop=("\n\n",), stream=True)  # Ollama streams unless told not to
    _, job = parse_ollama_request(raw({"model": "x", "prompt": "p", "suffix": "", "stream": False}), small)
    assert job.suffix is None and not job.stream and job.max_tokens == 32
    openai = parse_completion_request(raw({"model": "any", "prompt": "p", "suffix": "s", "stop": []}), small)
    assert completion_job(openai) == Job(("p",), 16, "s", stop=())  # any model name; [] turns the end of line off


@pytest.mark.parametrize(
    ("shape", "body", "param", "needle"),
    [
        ("infill", {"input_suffix": "s"}, "input_prefix", "input_prefix: Field required"),
        ("infill", {"input_prefix": "p" * 101}, "input_prefix", "input_prefix is 101 characters"),
        ("infill", {"input_prefix": "p", "prompt": "q" * 100}, "input_prefix", "at most 100"),  # prefix + prompt
        ("infill", {"input_prefix": "p", "input_suffix": "s" * 101}, "input_suffix", "at most 100"),
        ("infill", {"input_prefix": "p", "stop": [""]}, "stop", "non-empty"),
        ("completion", {"prompt": ["a"]}, "prompt", "token ids"),
        ("completion", {"prompt": "p", "seed": 2**64}, "seed", "less than or equal"),
        ("completion", {"prompt": "p", "temperature": float("nan")}, None, "NaN"),
        ("ollama", {"prompt": "p"}, "model", "Field required"),
        ("ollama", {"model": "m", "prompt": "p", "suffix": "s" * 101}, "suffix", "at most 100"),
        ("ollama", {"model": "m", "prompt": "p", "format": {"type": "object"}}, "format", "not supported"),
        ("ollama", {"model": "m", "prompt": "p", "images": ["aGk="]}, "images", "not supported"),
        ("ollama", {"model": "m", "options": {"stop": list("abcdefghijklmnopq")}}, "options.stop", "1 to 16"),
        ("openai", {"model": "m", "prompt": "p", "suffix": "s" * 101}, "suffix", "context"),
    ],
)
def test_editor_shape_mistakes_are_4xx(shape, body, param, needle):
    from kdcode.inference.requests import parse_llama_request, parse_ollama_request

    small = Limits(max_tokens=32, max_context_chars=100)
    raw = json.dumps(body).encode()
    with pytest.raises(RequestError) as info:
        if shape == "ollama":
            parse_ollama_request(raw, small)
        elif shape == "openai":
            parse_completion_request(raw, small)
        else:
            parse_llama_request(raw, small, infill=shape == "infill")
    err = info.value
    assert err.status == 400 and err.param == param and needle in err.message + str(err.code), vars(err)
    assert err.body("ollama") == {"error": err.message}
    assert err.body("llama") == {"error": {"code": 400, "message": err.message, "type": "invalid_request_error"}}


# ------------------------------------------------------------------ a full queue, the worker's queue
def test_a_busy_server_says_so_in_each_apis_shape():
    busy = RequestError(503, "the server is busy", code="server_busy", retry_after=1)
    assert busy.retry_after == 1
    assert busy.body() == {"error": {"message": "the server is busy", "type": "server_error", "param": None,
                                     "code": "server_busy"}}
    assert busy.body("llama") == {"error": {"code": 503, "message": "the server is busy", "type": "unavailable_error"}}
    assert busy.body("ollama") == {"error": "the server is busy"}
    assert RequestError(400, "x").retry_after is None


def test_the_worker_bounds_its_queue_and_never_runs_a_request_whose_client_left():
    """Ordered by events, not time: one request holds the worker; a second waits; a third is refused; the waiting
    one leaves and is dropped unrun; the running one sees its cancel event."""
    import asyncio
    import threading

    from kdcode.inference.worker import DROPPED, Worker

    async def scenario() -> None:
        worker = Worker(max_waiting=1)
        started, release = threading.Event(), threading.Event()
        ran: list[str] = []

        def hold(cancel: threading.Event) -> bool:
            started.set()
            release.wait(30)
            ran.append("hold")
            return cancel.is_set()

        first = worker.submit(hold)
        assert first is not None
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        second = worker.submit(lambda cancel: ran.append("second"))
        assert second is not None and worker.waiting == 1 and worker.current is first[0]
        assert worker.submit(lambda cancel: ran.append("third")) is None  # the queue is full
        worker.cancel(second[0])  # its client left while it waited
        assert worker.waiting == 0 and worker.dropped == 1
        worker.cancel(first[0])  # and the running one's
        release.set()
        assert await first[1] is True and await second[1] is DROPPED
        assert ran == ["hold"] and worker.current is None
        again = worker.submit(lambda cancel: "ran")
        assert again is not None and await again[1] == "ran"
        worker.shutdown()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="at least 0"):
        Worker(max_waiting=-1)
