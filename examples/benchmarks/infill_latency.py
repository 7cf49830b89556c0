"""Serve latency of a one-line infill as an editor feels it: `kdcode serve`'s app on a loopback port, a request
holding 1,500 characters before the cursor and 1,500 after it (a held-out stdlib file, the cursor after a
line's indentation), answered when the line is complete (default stop: the end of the line, at most 48
tokens). Timed from sending the request to having the whole answer, per endpoint shape (llama.cpp's /infill,
OpenAI's /v1/completions with suffix, Ollama's /api/generate), after warm-up, one request at a time.
Goal (issue 21): under 150 ms on a 2-core CPU for the FIM bundled teacher.

A model without FIM tokens can be measured with --add-fim-tokens: a copy gets untrained ones (speed does not
depend on what the weights learned; the completions are then not meaningful, and their lengths are reported).

    python examples/benchmarks/infill_latency.py bundled --reps 20 --threads 2 [--backend llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from kdcode.data.corpus import load_corpus
from kdcode.data.fim import ensure_tokens
from kdcode.inference.engine import load_engine
from kdcode.inference.server import create_app
from kdcode.models.load import load_model
from kdcode.spec import DataSpec

GOAL_MS = 150.0
CHARS = 1500


def holes(n: int, seed: int) -> list[tuple[str, str]]:
    """(1,500 characters before the cursor, 1,500 after it) at line starts after their indentation."""
    docs = [d for d in load_corpus(DataSpec()).splits["test"] if len(d.text) > 4 * CHARS]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = rng.choice(docs).text
        cut = text.find("\n", rng.randrange(CHARS, len(text) - CHARS)) + 1
        line = text[cut:].split("\n", 1)[0]
        if not line.strip():
            continue
        cursor = cut + len(line) - len(line.lstrip())
        out.append((text[cursor - CHARS : cursor], text[cursor : cursor + CHARS]))
    return out


def with_fim_tokens(name: str, folder: Path) -> str:
    loaded = load_model(name)
    ensure_tokens(loaded.tokenizer, loaded.model, None)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def bodies(prefix: str, suffix: str) -> dict[str, dict]:
    return {
        "/infill": {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 48},
        "/v1/completions": {"model": "m", "prompt": prefix, "suffix": suffix, "max_tokens": 48},
        "/api/generate": {"model": "m", "prompt": prefix, "suffix": suffix, "stream": False,
                          "options": {"num_predict": 48}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="torch", help="torch | onnxruntime | llama.cpp (as `kdcode serve --backend`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--add-fim-tokens", action="store_true", help="serve a copy with untrained FIM tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        name = with_fim_tokens(args.model, Path(tmp)) if args.add_fim_tokens else args.model
        engine = load_engine(name, device="cpu", threads=args.threads, verify=not args.add_fim_tokens,
                             runtime={"backend": args.backend})
        app = create_app(name, engine=engine, model_name=args.model)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        cases = holes(args.reps + 2, args.seed)
        results = {}
        with httpx.Client(timeout=60) as client:
            for path in bodies("", ""):
                times, lengths, tokens = [], [], []
                for i, (prefix, suffix) in enumerate(cases):
                    t0 = time.perf_counter()
                    r = client.post(url + path, json=bodies(prefix, suffix)[path])
                    dt = 1000 * (time.perf_counter() - t0)
                    r.raise_for_status()
                    if i >= 2:  # warm-up
                        times.append(dt)
                        body = r.json()
                        text = body.get("content", body.get("response")) or body.get("choices", [{}])[0].get("text")
                        lengths.append(len(text or ""))
                        tokens.append(body.get("tokens_predicted") or body.get("eval_count")
                                      or body.get("usage", {}).get("completion_tokens"))
                q = statistics.quantiles(times, n=20)
                results[path] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(q[-1], 1),
                                 "mean_tokens": round(statistics.mean(tokens), 1),
                                 "mean_chars": round(statistics.mean(lengths), 1)}
        server.should_exit = True
        thread.join(timeout=10)
    summary = {"model": args.model, "untrained_fim_tokens": args.add_fim_tokens, "runtime": engine.runtime,
               "prefix_chars": CHARS, "suffix_chars": CHARS, "reps": args.reps, "goal_ms": GOAL_MS,
               "endpoints": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
