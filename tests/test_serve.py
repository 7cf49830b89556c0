"""The OpenAI-compatible server, over real HTTP: a uvicorn server in a background thread on a free loopback port."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import run  # noqa: E402

from kdcode.errors import KdcodeError  # noqa: E402
from kdcode.inference.engine import Engine, load_engine  # noqa: E402
from kdcode.inference.server import create_app  # noqa: E402

PROMPTS = [
    "import os\n\n\ndef main(argv):\n    ",
    "class A:\n    def __init__(self):\n        self.x = 1\n",
    "x = ",
    "for i in range(10):\n    print(",
    "def f(a, b):\n    return a",
]
TIMEOUT = 60.0


class ServerThread:
    """uvicorn on 127.0.0.1, port 0 (the OS picks a free one), in a daemon thread; stopped on exit."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the server thread did not stop"


@pytest.fixture(scope="module")
def engine(teacher_dir) -> Engine:
    return load_engine(str(teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def server(teacher_dir, engine):
    with ServerThread(create_app(str(teacher_dir), engine=engine, max_tokens_limit=32)) as s:
        yield s


@pytest.fixture(scope="module")
def name(teacher_dir) -> str:
    return teacher_dir.name


def post(server, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}/v1/completions", content=data, headers={"content-type": "application/json"}, timeout=TIMEOUT
    )


def assert_error(r, status: int, needle: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    return err


def test_health_and_models(server, name):
    h = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == name
    m = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()
    assert m["object"] == "list" and [d["id"] for d in m["data"]] == [name]
    assert_error(httpx.get(f"{server.url}/nope", timeout=TIMEOUT), 404, "Not Found")


def test_completion_matches_the_engine(server, engine, name):
    r = post(server, {"model": name, "prompt": PROMPTS[0], "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == name and body["id"].startswith("cmpl-")
    want = engine.complete(PROMPTS[0], 12).choices[0]
    assert body["choices"] == [{"text": want.text, "index": 0, "logprobs": None, "finish_reason": want.finish_reason}]
    usage = body["usage"]
    assert usage["prompt_tokens"] == engine.count_tokens(PROMPTS[0])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_request_without_a_model_is_answered_by_the_served_one(server, engine, name):
    """As llama.cpp's and vLLM's servers do: ``model`` left out (or null) means the model being served."""
    want = engine.complete(PROMPTS[0], 12).choices[0].text
    for body in ({"prompt": PROMPTS[0], "max_tokens": 12}, {"model": None, "prompt": PROMPTS[0], "max_tokens": 12}):
        r = post(server, body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name and r.json()["choices"][0]["text"] == want
    chunks = sse_events(server, {"prompt": PROMPTS[0], "max_tokens": 12, "stream": True})
    assert chunks[-1] == "[DONE]" and all(json.loads(c)["model"] == name for c in chunks[:-1])


def test_list_prompts_n_beams_and_seeded_sampling(server, engine, name):
    r = post(server, {"model": name, "prompt": PROMPTS[:2], "max_tokens": 6, "n": 2})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == engine.complete(PROMPTS[0], 6, n=2).choices[0].text
    sample = {"model": name, "prompt": PROMPTS[2], "max_tokens": 6, "n": 3, "temperature": 0.9, "seed": 5}
    a, b = post(server, sample).json(), post(server, sample).json()
    assert len(a["choices"]) == 3 and a["choices"] == b["choices"]
    r = post(server, {"model": name, "prompt": PROMPTS[2], "max_tokens": 8, "stop": ["(", ")"]})
    assert r.status_code == 200 and not set("()") & set(r.json()["choices"][0]["text"])


def sse_events(server, body, path: str = "/v1/completions") -> list[str]:
    """The ``data:`` payloads of a streamed POST (server-sent events), after checking the response is a stream."""
    events = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
            assert len(events) < 1000
    return events


def test_streaming_adds_up_and_ends_with_done(server, engine, name):
    events = sse_events(
        server,
        {
            "model": name,
            "prompt": PROMPTS[3],
            "max_tokens": 12,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    want = engine.complete(PROMPTS[3], 12).choices[0]
    assert text == want.text
    assert chunks[-2]["choices"][0]["finish_reason"] == want.finish_reason


def test_oversized_prompt_is_refused(server, name, engine):
    prompt = PROMPTS[0] * 60
    assert engine.count_tokens(prompt) > engine.n_positions
    for stream in (False, True):
        err = assert_error(post(server, {"model": name, "prompt": prompt, "stream": stream}), 400, "tokens")
        assert err["code"] == "context_length_exceeded"
    with ServerThread(create_app("x", engine=engine, model_name="tiny", max_prompt_tokens=5)) as small:
        assert_error(post(small, {"model": "tiny", "prompt": PROMPTS[1]}), 400, "at most 5")
        assert post(small, {"model": "tiny", "prompt": "x ="}).status_code == 200


def test_concurrent_requests_get_the_sequential_answers(server, name):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(10)]
    bodies = [{"model": name, "prompt": p, "max_tokens": 10} for p in prompts]
    sequential = [post(server, b).json()["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda b: post(server, b), bodies))
    assert all(r.status_code == 200 for r in replies)
    assert [r.json()["choices"][0]["text"] for r in replies] == sequential
    # streamed and plain at once
    with ThreadPoolExecutor(4) as pool:
        streamed = list(pool.map(lambda b: sse_events(server, {**b, "stream": True}), bodies[:4]))
    for events, want in zip(streamed, sequential):
        assert "".join(ch["text"] for e in events[:-1] for ch in json.loads(e)["choices"]) == want


def test_official_openai_client(server, engine, name):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    assert [m.id for m in client.models.list()] == [name]
    want = engine.complete(PROMPTS[4], 10).choices[0]
    got = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    stream = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=1000)


# ------------------------------------------------------------------ hardening (issue 17, item 4)
def keep_alive(server) -> http.client.HTTPConnection:
    """One HTTP/1.1 connection, reused for every request sent on it (http.client does not reconnect while
    it holds an open socket: a connection the server dropped fails the next request)."""
    return http.client.HTTPConnection("127.0.0.1", urlsplit(server.url).port, timeout=TIMEOUT)


def exchange(conn, method: str, path: str, body: bytes | None = None) -> tuple[int, str | None, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.getheader("connection"), r.read()


def test_bad_requests_get_4xx_json_errors_and_the_connection_stays_open(server, name):
    """Every body a client may get wrong, sent on one keep-alive connection: its status, OpenAI's error shape
    (message, type, param, code) naming the field, and the connection still serving the next request. The red-team
    bodies (surrogates, huge seeds, deep nesting, NaN, bad UTF-8) each used to be a 500 with a traceback (and the
    surrogate's reset the client's next request). What each field accepts, case by case, is tests/test_requests.py
    (the parser, without a server)."""
    quoted = json.dumps(name).encode()

    def body(**fields) -> bytes:
        return json.dumps({"model": name, "prompt": "x", **fields}).encode()

    bodies = [  # (body, status, param, needle); the server closes the connection only on a body it did not read
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (json.dumps({"model": 5, "prompt": "x"}).encode(), 400, "model", "model"),
        (body(max_tokens="many"), 400, "max_tokens", "max_tokens"),
        (body(max_tokens=33), 400, "max_tokens", "at most 32"),
        (body(max_tokens=0), 400, "max_tokens", "max_tokens"),
        (body(temperature=-1), 400, "temperature", "temperature"),
        (body(prompt=[1, 2, 3]), 400, "prompt", "token ids"),
        (body(prompt=[]), 400, "prompt", "empty"),
        (body(stop=list("abcdefghijklmnopq")), 400, "stop", "stop"),
        (body(n=20), 400, "n", "at most"),
        (body(bogus=1), 400, "bogus", "bogus"),
        (body(echo=True), 400, "echo", "echo"),
        (body(best_of=2, temperature=1), 400, "best_of", "temperature 0"),
        (b'{"model": %s, "prompt": "\\ud800"}' % quoted, 400, "prompt", "surrogate"),
        (b'{"model": %s, "prompt": "x", "stop": ["\\udfff"]}' % quoted, 400, "stop.0", "surrogate"),
        (b'{"model": %s, "prompt": "x", "\\ud800": 1}' % quoted, 400, None, "surrogate"),
        (body(seed=2**64), 400, "seed", "less than or equal"),
        (body(seed=-1), 400, "seed", "greater than or equal"),
        (b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "deep"),
        (b'{"model": %s, "prompt": "x", "temperature": NaN}' % quoted, 400, None, "NaN"),
        (b'{"model": %s, "prompt": "x", "temperature": 1e999}' % quoted, 400, "temperature", "finite"),
        (b'{"model": "\xff\xfe", "prompt": "x"}', 400, None, "UTF-8"),
    ]
    conn = keep_alive(server)
    try:
        for data, status, param, needle in bodies:
            got, connection, answer = exchange(conn, "POST", "/v1/completions", data)
            assert got == status, (data[:80], answer)
            err = json.loads(answer)["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"], err
            assert connection != "close", data[:80]
            got, _, answer = exchange(conn, "GET", "/health")  # the same connection, still open
            assert got == 200 and json.loads(answer)["status"] == "ok"
    finally:
        conn.close()
    # A body over the limit is refused by its Content-Length, unread, and that connection is closed (its bytes would
    # still be on the wire). Only the headers are sent: sending the body races the server's close (a broken pipe).
    conn = keep_alive(server)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(2**20 + 16))
        conn.endheaders()
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 413 and r.getheader("connection") == "close"
        assert err["type"] == "invalid_request_error" and "over" in err["message"], err
    finally:
        conn.close()


def test_tiny_temperatures_sample_the_greedy_completion(server, engine, name):
    """Below ~1e-38, float32 logits / T overflow; the limit of sampling there is the argmax."""
    want = engine.complete(PROMPTS[4], 6).choices[0].text
    for t in (1e-30, 1e-40, 5e-324):
        r = post(server, {"model": name, "prompt": PROMPTS[4], "max_tokens": 6, "temperature": t, "seed": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text


class Broken:
    """The engine, but completing fails inside it: an internal error, not the client's."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, attr: str):
        return getattr(self._engine, attr)

    def complete(self, *args, **kwargs):
        raise RuntimeError("a bug")


def test_an_internal_error_is_a_500_that_leaves_the_connection_and_server_healthy(engine):
    with ServerThread(create_app("x", engine=Broken(engine), model_name="tiny")) as broken:
        conn = keep_alive(broken)
        try:
            for _ in range(2):
                status, connection, data = exchange(conn, "POST", "/v1/completions", b'{"model":"tiny","prompt":"x"}')
                assert status == 500 and connection != "close"
                assert json.loads(data)["error"] == {
                    "message": "internal error: RuntimeError", "type": "server_error", "param": None, "code": None
                }
                status, _, data = exchange(conn, "GET", "/health")  # the same connection
                assert status == 200 and json.loads(data)["status"] == "ok"
        finally:
            conn.close()
        events = sse_events(broken, {"model": "tiny", "prompt": "x", "stream": True})
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        assert httpx.get(f"{broken.url}/health", timeout=TIMEOUT).status_code == 200


@pytest.fixture(scope="module")
def strict(engine):
    """A server that waits 1 s for a body and takes 4 KiB at most."""
    with ServerThread(create_app("x", engine=engine, model_name="tiny", body_timeout=1.0, max_body_bytes=4096)) as s:
        yield s


def test_a_body_that_never_arrives_is_answered_408_and_closed(strict):
    """Content-Length: 100 and one byte sent: answered within a few seconds, not held open."""
    port = urlsplit(strict.url).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        sock.settimeout(5)  # the server's limit is 1 s: a reply after 5 s (or none) fails the test
        data = b""
        for _ in range(100):  # bounded: read to the close
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        else:
            pytest.fail("the server kept the connection open")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
    assert "did not arrive within 1 s" in json.loads(body)["error"]["message"]
    assert httpx.get(f"{strict.url}/health", timeout=TIMEOUT).status_code == 200


def test_a_chunked_body_over_the_limit_is_413(strict):
    """No Content-Length to refuse up front: the body is counted as it is read."""
    chunks = iter([b'{"model": "tiny", "prompt": "', b"x" * 3000, b"x" * 3000, b'"}'])
    r = httpx.post(f"{strict.url}/v1/completions", content=chunks, timeout=TIMEOUT)
    assert_error(r, 413, "over 4096 bytes")
    assert post(strict, {"model": "tiny", "prompt": "x =", "max_tokens": 2}).status_code == 200


def test_bad_limits_are_one_line(engine):
    r = run("serve", "bundled", "--body-timeout", "0")
    assert r.exit_code == 2 and "--body-timeout: Input should be greater than 0" in r.output
    with pytest.raises(KdcodeError, match="body_timeout"):
        create_app("x", engine=engine, body_timeout=-1)


def test_serve_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import fails as if it were not installed
    r = run("serve", "bundled")
    assert r.exit_code == 2 and "pip install 'kdcode[serve]'" in r.output


# ------------------------------------------------------------------ clients that leave, a bounded queue
class Gate:
    """Counts a model's forward passes; pass ``hold_at`` (from 1) signals ``reached`` and waits for ``release()``,
    which holds the model's worker inside one request at a known step."""

    def __init__(self, model, hold_at: int | None = None) -> None:
        self.passes, self.hold_at = 0, hold_at
        self.reached, self.opened = threading.Event(), threading.Event()
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, _module, _args) -> None:
        self.passes += 1
        if self.passes == self.hold_at:
            self.reached.set()
            assert self.opened.wait(TIMEOUT), "the gate was never released"

    def wait(self) -> None:
        assert self.reached.wait(TIMEOUT), "the model never reached the gate"

    def release(self) -> None:
        self.opened.set()


def send_raw(server, path: str, body: dict) -> socket.socket:
    """A client that sends a whole request and reads nothing: closing the socket is leaving."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", urlsplit(server.url).port), timeout=TIMEOUT)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(data)) + data)
    return sock


def wait_for(condition, what: str) -> None:
    """Until ``condition()`` holds: the test decides on the event; the deadline only keeps a failure from hanging."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()


def test_a_disconnect_storm_is_not_generated_and_the_next_request_is_served(teacher_dir):
    """20 clients send a long non-streamed request and leave while it waits: none of them costs a model pass; the
    next request is answered. Passes are counted, nothing is timed."""
    engine = load_engine(str(teacher_dir), device="cpu", warm_up=False)
    gate = Gate(engine.model, hold_at=1)  # the worker held inside the first request's prefill
    app = create_app("x", engine=engine, model_name="tiny", max_tokens_limit=128, max_queue=32)
    worker = app.state.server.worker
    with ServerThread(app) as s, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, s, {"prompt": PROMPTS[0], "max_tokens": 4, "stop": []})
        gate.wait()
        storm = [send_raw(s, "/v1/completions", {"prompt": PROMPTS[i % 5], "max_tokens": 120, "stop": []})
                 for i in range(20)]
        wait_for(lambda: health(s)["waiting"] == 20, "20 waiting requests")
        assert health(s)["busy"] is True and health(s)["max_waiting"] == 32
        for sock in storm:
            sock.close()
        wait_for(lambda: worker.waiting == 0, "the storm's requests to be dropped")
        assert worker.dropped == 20 and health(s)["waiting"] == 0
        gate.release()
        answered = [first.result(), post(s, {"prompt": PROMPTS[3], "max_tokens": 5, "stop": []})]
        assert all(r.status_code == 200 for r in answered), [r.text for r in answered]
        # greedy: one pass per generated token; the 20 requests of 120 tokens made none
        assert gate.passes == sum(r.json()["usage"]["completion_tokens"] for r in answered)
        assert health(s)["waiting"] == 0 and health(s)["busy"] is False
    gate.handle.remove()


def test_a_bad_queue_bound_is_one_line(engine):
    with pytest.raises(KdcodeError, match="max_queue: Input should be greater than or equal to 0"):
        create_app("x", engine=engine, max_queue=-1)
    r = run("serve", "bundled", "--max-queue", "-1")
    assert r.exit_code == 2 and "--max-queue: Input should be greater than or equal to 0" in r.output
