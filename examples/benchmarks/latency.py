"""Completion latency as an editor feels it: batch 1, on CPU, prompts of 256 and 900 tokens.

For each model (a folder, or 'bundled'): time to first token (tokenizing, prefill and the first token), ms
per further token (16 tokens, no stop), and the time to complete a line the way `kdcode complete` / `kdcode
serve` do (stop at the end of the line, at most 16 tokens). Prompts are held-out stdlib files cut after a
line's indentation, as an editor sends them; a prompt longer than the model's context minus the 16 new
tokens is cut to it (the table says so). Greedy decoding, KV cache, after warm-up, models one after another
in this process. Goal (issue 10): the default student completes a typical line in under 100 ms on a 2-core
CPU. On a CPU that another job keeps busy, pass --threads 1: torch's default (one thread per core) then
has its threads wait on each other, and a token can take 100x longer.

    python examples/benchmarks/latency.py bundled student student-int8 --reps 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kdcode.data.corpus import load_corpus
from kdcode.inference.engine import load_engine
from kdcode.spec import DataSpec

NEW_TOKENS = 16
GOAL_MS = 100.0


def editor_prefixes(n: int, seed: int) -> list[str]:
    """Held-out files cut after the indentation of a random non-blank line (not the first)."""
    corpus = load_corpus(DataSpec())
    docs = corpus.splits["test"] or [d for s in corpus.splits.values() for d in s]
    cuts = []
    for doc in docs:
        offset = 0
        for i, line in enumerate(doc.text.splitlines(keepends=True)):
            if line.strip() and i > 0:
                cuts.append(doc.text[: offset + len(line) - len(line.lstrip(" \t"))])
            offset += len(line)
    return random.Random(seed).sample(cuts, min(n, len(cuts)))


def cut_to(engine: Any, text: str, tokens: int) -> str:
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return engine.tokenizer.decode(ids[-tokens:])


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def measure(name: str, texts: list[str], lengths: list[int], warm: list[str]) -> list[dict[str, Any]]:
    engine = load_engine(name, device="cpu")
    for text in warm:
        engine.complete(cut_to(engine, text, engine.n_positions - NEW_TOKENS), NEW_TOKENS)
    rows = []
    for length in lengths:
        usable = min(length, engine.n_positions - NEW_TOKENS)
        prompts = [cut_to(engine, t, usable) for t in texts]
        ttft, per_token, line_ms, line_tokens, prompt_tokens = [], [], [], [], []
        for prompt in prompts:
            fixed = engine.complete(prompt, NEW_TOKENS, stop=())
            k = fixed.choices[0].tokens
            ttft.append(1000 * fixed.first_token_s)
            if k > 1:
                per_token.append(1000 * (fixed.total_s - fixed.first_token_s) / (k - 1))
            line = engine.complete(prompt, NEW_TOKENS)
            line_ms.append(1000 * line.total_s)
            line_tokens.append(line.choices[0].tokens)
            prompt_tokens.append(fixed.prompt_tokens)
        rows.append(
            {
                "model": name,
                "prompt_tokens_asked": length,
                "prompt_tokens": round(statistics.mean(prompt_tokens)),
                "cut_to_context": usable < length,
                "n_positions": engine.n_positions,
                "params_m": round(engine.loaded.params / 1e6, 2),
                "dtype": engine.dtype,
                "ttft_ms_p50": p50(ttft),
                "ms_per_token_p50": p50(per_token),
                "line_ms_p50": p50(line_ms),
                "line_ms_max": round(max(line_ms), 1),
                "line_tokens_mean": round(statistics.mean(line_tokens), 1),
                "prompts": len(prompts),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model folders or 'bundled' (teacher, student, compressed student...)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 900], help="prompt lengths in tokens")
    ap.add_argument("--reps", type=int, default=10, help="timed prompts per length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    texts = editor_prefixes(args.reps + args.warmup, args.seed)
    warm, timed = texts[: args.warmup], texts[args.warmup :]  # the warm-up prompts are not the timed ones
    rows = [row for name in args.models for row in measure(name, timed, args.lengths, warm)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # another busy process shows here
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"load average {load:.1f} at start"
    )
    table = Table(title=f"latency, batch 1, CPU ({machine}), greedy, KV cache, {args.reps} prompts per length")
    cols = [
        "model",
        "dtype",
        "params (M)",
        "prompt tok",
        "TTFT p50 ms",
        "ms/token p50",
        "line ms p50",
        "line ms max",
        "line tokens",
        f"line < {GOAL_MS:.0f} ms",
    ]
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        asked = f"{r['prompt_tokens']}" + (f" (cut from {r['prompt_tokens_asked']})" if r["cut_to_context"] else "")
        table.add_row(
            r["model"],
            r["dtype"],
            str(r["params_m"]),
            asked,
            str(r["ttft_ms_p50"]),
            str(r["ms_per_token_p50"]),
            str(r["line_ms_p50"]),
            str(r["line_ms_max"]),
            str(r["line_tokens_mean"]),
            "yes" if r["line_ms_p50"] < GOAL_MS else "no",
        )
    Console(width=180).print(table)  # wide enough for every column, whatever the terminal
    if any(r["cut_to_context"] for r in rows):
        print(f"note: prompts longer than a model's context minus {NEW_TOKENS} new tokens were cut to it.")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
