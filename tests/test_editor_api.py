"""The editor endpoints over real HTTP on a loopback port, each with the request shape its client sends, streamed
and not: OpenAI's /v1/completions with a suffix (the official client too), llama.cpp's /infill (llama.vim) and
/completion (Tabby), Ollama's /api/generate (Continue), the model lists, bad requests as 4xx JSON errors
in each API's shape, a full queue as a 503 with Retry-After in each shape, and a client that leaves mid-answer
stopping its generation within one model pass on every endpoint, with and without a draft."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import Gate, ServerThread, health, send_raw, sse_events, wait_for  # noqa: E402

from kdcode.inference.engine import Engine, load_engine  # noqa: E402
from kdcode.inference.server import create_app  # noqa: E402

TIMEOUT = 60.0
PREFIX = "import os\n\n\ndef main(argv):\n    path = os.path.join("
SUFFIX = ")\n    return path\n"


@pytest.fixture(scope="module")
def engine(fim_teacher_dir) -> Engine:
    return load_engine(str(fim_teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def server(fim_teacher_dir, engine):
    app = create_app(str(fim_teacher_dir), engine=engine, model_name="kdcode-tiny", max_tokens_limit=24,
                     max_context_chars=2000)
    with ServerThread(app) as s:
        yield s


def want(engine: Engine, prefix: str = PREFIX, suffix: str | None = SUFFIX, max_tokens: int = 12, **kw):
    return engine.complete(prefix, max_tokens, suffix=suffix, **kw).choices[0]


def post(server, path: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=data, headers={"content-type": "application/json"},
                      timeout=TIMEOUT, **kw)


def sse(server, path: str, body) -> list[dict]:
    events = sse_events(server, body, path)
    return [json.loads(e) for e in events if e != "[DONE]"] + ([{"done": True}] if events[-1] == "[DONE]" else [])


def ndjson(server, body) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line.strip()]


# ------------------------------------------------------------------------------------------- OpenAI
def test_openai_suffix_any_model_name_streamed_and_not(server, engine):
    expect = want(engine)
    assert expect.text and "\n" not in expect.text  # the default stop: the end of the line
    r = post(server, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": PREFIX, "suffix": SUFFIX,
                                         "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "kdcode-tiny" and body["choices"][0]["text"] == expect.text
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer(PREFIX)["input_ids"]) + len(
        engine.tokenizer(SUFFIX)["input_ids"]) + 3 - 1  # the prefix's last token is healed: the middle starts with it
    chunks = sse(server, "/v1/completions", {"model": "x", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12,
                                             "stream": True})
    assert chunks[-1] == {"done": True} and all(c["model"] == "kdcode-tiny" for c in chunks[:-1])
    assert "".join(ch["text"] for c in chunks[:-1] for ch in c["choices"]) == expect.text
    # an empty suffix is no suffix, as OpenAI reads it: plain completion
    r = post(server, "/v1/completions", {"model": "x", "prompt": PREFIX, "suffix": "", "max_tokens": 12})
    assert r.json()["choices"][0]["text"] == want(engine, suffix=None).text


@pytest.mark.slow
def test_official_openai_client_sends_the_suffix(server, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    assert [m.id for m in client.models.list()] == ["kdcode-tiny"]
    expect = want(engine).text
    own = client.completions.create(model="any", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0)
    extra = client.completions.create(model="any", prompt=PREFIX, max_tokens=12, extra_body={"suffix": SUFFIX})
    assert own.choices[0].text == extra.choices[0].text == expect and own.model == "kdcode-tiny"
    stream = client.completions.create(model="any", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expect


def test_a_templated_prompt_is_read_as_prefix_and_suffix(server, engine):
    """Continue (openai provider) and Tabby build the FIM prompt themselves: the server cuts it like an infill."""
    stops = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
             "</code>"]  # Continue's StarCoder template sends these 7 stop strings
    long_prefix = "x = 1\n" * 300 + PREFIX  # longer than the model's context: cut, not refused
    prompt = f"<fim_prefix>{long_prefix}<fim_suffix>{SUFFIX}<fim_middle>"
    r = post(server, "/v1/completions", {"model": "starcoder2:3b", "prompt": prompt, "max_tokens": 12, "stop": stops,
                                         "stream": False, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want(engine, long_prefix, stop=stops).text


# ------------------------------------------------------------------------------------------- llama.cpp
LLAMA_VIM = {  # every field llama.vim's llama#fim sends
    "input_prefix": "import os\n\n\ndef main(argv):\n", "input_suffix": "\n    return path\n",
    "input_extra": [{"text": "def helper():\n    pass\n", "time": [1, 2], "filename": "other.py"}],
    "prompt": "    path = os.path.join(", "n_predict": 256, "n_indent": 4, "top_k": 40, "top_p": 0.99,
    "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1500,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                        "tokens_cached"],
}


def test_infill_as_llama_vim_sends_it(server, engine):
    expect = want(engine, LLAMA_VIM["input_prefix"] + LLAMA_VIM["prompt"], LLAMA_VIM["input_suffix"], 24)
    r = post(server, "/infill", LLAMA_VIM)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == set(LLAMA_VIM["response_fields"]) and body["content"] == expect.text
    assert body["timings/predicted_n"] == expect.tokens and body["truncated"] is False
    # its context-only request (n_predict 0) is answered at once, with nothing generated
    ring = {**LLAMA_VIM, "input_prefix": "", "input_suffix": "", "prompt": "", "n_predict": 0,
            "response_fields": [""]}
    assert post(server, "/infill", ring).json() == {}
    events = sse(server, "/infill", {**LLAMA_VIM, "stream": True, "response_fields": None})
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == expect.text and events[-1]["model"] == "kdcode-tiny"


@pytest.mark.slow
def test_completion_as_tabby_sends_it(server, engine):
    """Tabby's llama.cpp/completion backend: its prompt_template filled in, a u64 seed, streamed; it reads each
    event's `content` and stops at `stop: true` (no [DONE])."""
    tabby = {"seed": 2**64 - 1, "prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", "n_predict": 64,
             "temperature": 0.0, "stream": True, "penalty_last_n": 0, "presence_penalty": 0.0}
    events = sse(server, "/completion", tabby)
    assert events[-1]["stop"] is True and {"done": True} not in events
    assert "".join(e["content"] for e in events) == want(engine, max_tokens=24).text
    body = post(server, "/completion", {**tabby, "stream": False}).json()
    assert body["content"] == want(engine, max_tokens=24).text and body["stop"] is True
    assert body["model"] == "kdcode-tiny" and body["generation_settings"]["n_predict"] == 24  # capped
    sampled = {**tabby, "stream": False, "temperature": 0.7, "seed": 12345}
    assert post(server, "/completion", sampled).json()["content"] == post(server, "/completion", sampled).json()[
        "content"]
    plain = post(server, "/completion", {"prompt": PREFIX, "n_predict": 8}).json()
    assert plain["content"] == want(engine, suffix=None, max_tokens=8).text


# ------------------------------------------------------------------------------------------- Ollama
def test_generate_as_continue_sends_it(server, engine):
    """Continue's Ollama provider: /api/show first (a template with .Suffix: it sends prefix and suffix apart),
    then /api/generate streamed as newline-delimited JSON."""
    show = post(server, "/api/show", {"name": "qwen2.5-coder:1.5b"}).json()
    assert ".Suffix" in show["template"] and "<fim_prefix>" in show["template"] and "insert" in show["capabilities"]
    assert show["parameters"] == ""  # Continue parses each line of a non-empty one
    body = {"model": "qwen2.5-coder:1.5b", "prompt": PREFIX, "suffix": SUFFIX, "keep_alive": 1800,
            "options": {"temperature": 0.01, "num_predict": 12, "stop": ["\n\n", "<fim_prefix>"], "num_ctx": 4096,
                        "top_p": 0.9, "top_k": 40}}
    lines = ndjson(server, body)  # sampled (temperature 0.01, no seed): its shape, not its text
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
    assert all(x["model"] == "kdcode-tiny" for x in lines) and lines[-1]["done_reason"] in ("stop", "length")
    assert 1 <= lines[-1]["eval_count"] <= 12 and "\n\n" not in "".join(x["response"] for x in lines)
    greedy = ndjson(server, {**body, "options": {"num_predict": 12}})
    assert "".join(x["response"] for x in greedy) == want(engine).text  # temperature 0 unless asked
    r = post(server, "/api/generate", {**body, "stream": False, "options": {"num_predict": 12}})
    assert r.status_code == 200 and r.json()["response"] == want(engine).text and r.json()["done"] is True
    # Continue without /api/show: its template filled in, raw
    raw = {"model": "starcoder", "prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>", "raw": True,
           "stream": False, "options": {"num_predict": 12}}
    assert post(server, "/api/generate", raw).json()["response"] == want(engine).text
    assert post(server, "/api/generate", {"model": "m"}).json()["done_reason"] == "load"


def _stamp(path) -> str:
    """A file's last change as Ollama writes times (UTC, milliseconds)."""
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_model_lists(server, fim_teacher_dir):
    tags = httpx.get(f"{server.url}/api/tags", timeout=TIMEOUT).json()["models"]
    assert [m["name"] for m in tags] == ["kdcode-tiny"] and tags[0]["details"]["family"]
    weights = fim_teacher_dir / "model.safetensors"
    assert tags[0]["size"] == weights.stat().st_size and tags[0]["details"]["format"] == "safetensors"
    assert tags[0]["modified_at"] == _stamp(weights)  # the weights' last change, not the time of the request
    models = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()["data"]
    assert [m["id"] for m in models] == ["kdcode-tiny"]
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["infill"] == "starcoder"


def test_stop_strings_are_honoured_everywhere(server, engine):
    full = want(engine, max_tokens=24, stop=[]).text  # no stop string: it runs on
    assert len(full) >= 2, full
    stop = full[1]
    cut = full[: full.index(stop)]
    openai = post(server, "/v1/completions", {"model": "m", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 24,
                                              "stop": [stop]}).json()["choices"][0]["text"]
    infill = post(server, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 24,
                                      "stop": [stop]}).json()["content"]
    completion = post(server, "/completion", {"prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
                                              "n_predict": 24, "stop": [stop]}).json()["content"]
    ollama = post(server, "/api/generate", {"model": "m", "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
                                            "options": {"num_predict": 24, "stop": [stop]}}).json()["response"]
    assert openai == infill == completion == ollama == cut
    runs_on = post(server, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 24, "stop": []})
    assert runs_on.json()["content"] == full


def test_api_show_infills_in_the_order_of_the_exported_modelfile(tmp_path, fim_teacher_dir):
    """A model kdcode trained with SPM pieces: /api/show's template (which Continue fills) and the Modelfile of its
    GGUF export are the same SPM template, not PSM in one and SPM in the other."""
    import shutil

    from fastapi.testclient import TestClient

    from kdcode.export.modelfile import template
    from kdcode.models.artifacts import read_manifest, write_json

    folder = tmp_path / "spm"
    shutil.copytree(fim_teacher_dir, folder)
    write_json(folder / "kdcode.json", {**(read_manifest(folder) or {}),
                                        "fim": {"rate": 0.5, "spm_rate": 0.5, "format": "starcoder"}})
    eng = load_engine(str(folder), device="cpu", warm_up=False, verify=False)
    with TestClient(create_app(str(folder), engine=eng, model_name="m")) as client:
        shown = client.post("/api/show", json={"name": "m"}).json()["template"]
    assert shown == template(eng.fim, "spm")
    assert shown.index("<fim_suffix>{{ .Suffix }}") < shown.index("<fim_middle>{{ .Prompt }}")  # SPM: suffix first
    pytest.importorskip("gguf")
    from kdcode.export.run import modelfile_path, run_export
    from kdcode.spec_compress import ExportSpec

    out = tmp_path / "spm.gguf"
    run_export(str(folder), ExportSpec(format="gguf"), out, verify=False)
    line = next(x for x in modelfile_path(out).read_text().splitlines() if x.startswith("TEMPLATE "))
    assert line == f'TEMPLATE "{shown}"'


# ------------------------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("path", "body", "param", "needle"),
    [
        ("/infill", {"input_suffix": SUFFIX}, "input_prefix", "input_prefix: Field required"),
        ("/infill", {"input_prefix": "x", "input_suffix": "y" * 2001}, "input_suffix", "at most 2000"),
        ("/infill", {"input_prefix": "x", "n_predict": "many"}, "n_predict", "integer"),
        ("/completion", {"n_predict": 4}, "prompt", "prompt: Field required"),
        ("/completion", {"prompt": [1, 2, 3]}, "prompt", "token ids"),
        ("/v1/completions", {"model": "m", "prompt": "x", "suffix": "y" * 2001}, "suffix", "at most 2000"),
        ("/v1/completions", {"model": "m", "prompt": "x" * 2001, "suffix": "y"}, "prompt", "at most 2000"),
        ("/api/generate", {"prompt": "x"}, "model", "model: Field required"),
        ("/api/generate", {"model": "m", "prompt": "x", "suffix": "y" * 2001}, "suffix", "at most 2000"),
        ("/api/generate", {"model": "m", "prompt": "x", "format": "json"}, "format", "format \"json\" is not"),
        ("/api/generate", {"model": "m", "prompt": "x", "options": {"temperature": -1}}, "options", "temperature"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_are_4xx_json_in_each_apis_shape(server, path, body, param, needle, stream):
    r = post(server, path, {**body, "stream": stream})
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/json", r.text
    err = r.json()["error"]
    if path == "/api/generate":  # Ollama: {"error": "message"}
        assert isinstance(err, str) and needle in err and "\n" not in err
    elif path == "/v1/completions":  # OpenAI: message, type, param, code
        assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error"
    else:  # llama.cpp: code, message, type
        assert err["code"] == r.status_code and needle in err["message"] and err["type"] == "invalid_request_error"


def test_a_suffix_for_a_model_that_does_not_infill_is_a_400(teacher_dir):
    plain = load_engine(str(teacher_dir), device="cpu", warm_up=False)
    with ServerThread(create_app("x", engine=plain, model_name="plain")) as s:
        r = post(s, "/v1/completions", {"model": "m", "prompt": "x", "suffix": "y"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "fim_not_supported"
        assert "does not infill" in post(s, "/api/generate", {"model": "m", "prompt": "x", "suffix": "y"}).json()[
            "error"]
        r = post(s, "/infill", {"input_prefix": "x", "input_suffix": "y", "stream": True})
        assert r.status_code == 400 and "does not infill" in r.json()["error"]["message"]
        show = post(s, "/api/show", {"name": "m"}).json()
        assert ".Suffix" not in show["template"] and "insert" not in show["capabilities"]
        # a FIM template's text is plain text to it: completed as it is
        assert post(s, "/completion", {"prompt": "<fim_prefix>x<fim_suffix>y<fim_middle>", "n_predict": 2}
                    ).status_code == 200


# ------------------------------------------------------------------------------------------- leaving, queueing
def _bodies(stream: bool) -> dict[str, dict]:
    """A 24-token request to each generation endpoint, with no stop string (it runs to its end)."""
    return {
        "/v1/completions": {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 24, "stop": [], "stream": stream},
        "/infill": {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 24, "stop": [], "stream": stream},
        "/completion": {"prompt": PREFIX, "n_predict": 24, "stop": [], "stream": stream},
        "/api/generate": {"model": "m", "prompt": PREFIX, "suffix": SUFFIX, "stream": stream,
                          "options": {"num_predict": 24, "stop": []}},
    }


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, teacher_dir):
    from conftest import make_fim_model

    return make_fim_model(tmp_path_factory.mktemp("fim_draft"), teacher_dir, seed=1, n_layer=2)


@pytest.mark.parametrize("drafted", [False, True], ids=["plain", "draft"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path", list(_bodies(False)))
def test_a_client_that_leaves_stops_its_generation_within_one_pass(fim_teacher_dir, draft_dir, path, stream,
                                                                   drafted):
    """The client closes its connection while the model runs the request's third pass: that pass is its last (the
    target's and the draft's), and the next request is served."""
    eng = load_engine(str(fim_teacher_dir), device="cpu", warm_up=False, draft=str(draft_dir) if drafted else None,
                      draft_tokens=2)
    gate = Gate(eng.model, hold_at=3)
    drafts = Gate(eng.draft.model) if drafted else None
    app = create_app("x", engine=eng, model_name="m", max_tokens_limit=24)
    worker = app.state.server.worker
    with ServerThread(app) as s:
        client = send_raw(s, path, _bodies(stream)[path])
        gate.wait()
        drafted_before = drafts.passes if drafts else 0
        client.close()
        wait_for(lambda: worker.current is not None and worker.current.cancel.is_set(), "the server to see it leave")
        gate.release()
        wait_for(lambda: worker.current is None, "the request to end")
        assert gate.passes == 3 and (drafts.passes if drafts else 0) == drafted_before
        r = post(s, path, {**_bodies(False)[path], **({"max_tokens": 2} if path == "/v1/completions" else
                                                      {"n_predict": 2} if path != "/api/generate" else
                                                      {"options": {"num_predict": 2}})})
        assert r.status_code == 200, r.text
    gate.handle.remove()
    if drafts:
        drafts.handle.remove()


def _busy_error(r: httpx.Response, path: str) -> None:
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    if path == "/api/generate":  # Ollama's shape
        assert isinstance(err, str) and "busy" in err
    elif path == "/v1/completions":  # OpenAI's
        assert err["type"] == "server_error" and err["code"] == "server_busy" and "busy" in err["message"]
    else:  # llama.cpp's
        assert err == {"code": 503, "message": err["message"], "type": "unavailable_error"} and "busy" in err["message"]


def test_a_full_queue_is_a_503_with_retry_after_in_each_apis_shape(fim_teacher_dir):
    eng = load_engine(str(fim_teacher_dir), device="cpu", warm_up=False)
    gate = Gate(eng.model, hold_at=1)
    app = create_app("x", engine=eng, model_name="m", max_tokens_limit=24, max_queue=1)
    with ServerThread(app) as s, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, s, "/infill", _bodies(False)["/infill"])
        gate.wait()
        queued = pool.submit(post, s, "/api/generate", _bodies(False)["/api/generate"])
        wait_for(lambda: health(s)["waiting"] == 1, "one waiting request")
        for stream in (False, True):
            for path, body in _bodies(stream).items():
                _busy_error(post(s, path, body), path)
        assert health(s)["waiting"] == 1  # the refused ones never queued
        gate.release()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert health(s)["waiting"] == 0
    gate.handle.remove()
