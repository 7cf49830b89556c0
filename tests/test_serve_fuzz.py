"""Fuzzing the server in process: random request-shaped JSON, random JSON and random bytes get 2xx or 4xx
(4xx in OpenAI's error shape, never a 500), and the server answers /health after each, with no request left
waiting or running. The model's KV cache is kept from one fuzzed request to the next (the reuse path meets every
odd prompt)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdcode.inference.engine import load_engine  # noqa: E402
from kdcode.inference.server import create_app  # noqa: E402

NAME = "tiny"
FUZZ = settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)

# text with what trips servers up: lone surrogates, the line ends the decoder stops at, py150's markers
markers = st.sampled_from(["\n", "    ", "(", "<EOL>", "\x00", "def"])
surrogates = st.characters(categories=["Cs"])
texts = st.lists(st.characters() | st.characters() | surrogates | markers, max_size=8).map("".join)
numbers = st.integers() | st.floats() | st.integers(2**62, 2**70) | st.sampled_from([0, 1, 2, 1e-30, 1e-40])
leaves = st.none() | st.booleans() | numbers | texts
values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3),
                      max_leaves=8)
small = st.integers(-1, 5)
# each field's wild values: wrong types, out of range, huge integers, NaN, lone surrogates
WILD = {
    "model": texts | values,
    "prompt": texts | st.lists(texts, max_size=3) | values,
    "max_tokens": small | numbers | values,
    "temperature": st.sampled_from([2.5, -1, 1e-30]) | numbers | values,
    "top_p": numbers,
    "n": small | numbers,
    "best_of": small | numbers,
    "stop": texts | st.lists(texts, max_size=5) | values,
    "seed": st.integers() | st.sampled_from([-1, 2**63, 2**64]) | values,
    "stream": values,
    "stream_options": st.dictionaries(texts, values, max_size=2) | values,
    "echo": values,
    "logprobs": small | values,
    "suffix": texts | values,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "logit_bias": st.dictionaries(texts, numbers, max_size=2) | values,
    "user": texts | values,
}
# each field's usable values, so that most requests reach the model and a few fields at a time go wrong
clean = st.lists(st.characters(codec="utf-8") | markers, max_size=8).map("".join)
USABLE = {
    "temperature": st.sampled_from([0, 0.0, 0.7, 2]) | st.floats(0, 2),
    "n": st.integers(1, 3),
    "best_of": st.none() | st.integers(1, 4),
    "stop": st.none() | clean.filter(bool) | st.lists(clean.filter(bool), min_size=1, max_size=4),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": clean,
}
requests = st.builds(
    lambda base, wild, extra: {**base, **wild, **extra},
    st.fixed_dictionaries(
        {"model": st.just(NAME), "prompt": clean | st.lists(clean, min_size=1, max_size=3),
         "max_tokens": st.integers(1, 4)},
        optional=USABLE,
    ),
    st.one_of(  # no field, one field, or a few fields gone wrong
        st.just({}),
        st.just({}),
        st.one_of(*(st.fixed_dictionaries({k: v}) for k, v in WILD.items())),
        st.builds(dict, st.lists(st.one_of(*(st.tuples(st.just(k), v) for k, v in WILD.items())), max_size=3)),
    ),
    st.just({}) | st.just({}) | st.dictionaries(texts, values, min_size=1, max_size=2),  # unknown fields
)


def dumps(value, raw: bool) -> bytes:
    """JSON text: escaped ASCII (surrogates as \\ud800, NaN as NaN), or raw (a surrogate is then invalid UTF-8)."""
    text = json.dumps(value, ensure_ascii=not raw)
    return text.encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.builds(dumps, requests, st.booleans()),
    st.builds(dumps, values, st.booleans()),
    st.binary(max_size=64),
    st.integers(1, 200_000).map(lambda d: b'{"model": "tiny", "prompt": ' + b"[" * d + b"]" * d + b"}"),
)


@pytest.fixture(scope="module")
def client(teacher_dir):
    engine = load_engine(str(teacher_dir), device="cpu", warm_up=False)
    app = create_app(str(teacher_dir), engine=engine, model_name=NAME, max_tokens_limit=4)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check(client: TestClient, body: bytes) -> None:
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    event(f"status {r.status_code}")  # pytest --hypothesis-show-statistics: how many reach the model
    assert r.status_code < 500, (body[:200], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
        assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and "server_error" not in r.text, r.text[-300:]
    else:
        assert r.json()["object"] == "text_completion"
    status = client.get("/health").json()
    assert status["status"] == "ok" and status["waiting"] == 0 and status["busy"] is False  # every job ended


@FUZZ
@given(body=bodies)
def test_random_bodies_get_no_500(client, body):
    check(client, body)


@FUZZ
@given(request=requests)
def test_random_requests_get_no_500(client, request):
    check(client, dumps(request, raw=False))


def test_a_valid_request_answers_through_the_same_client(client):
    """The fuzz's checks can fail: a well-formed request gets a completion."""
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "def f(", "max_tokens": 3, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
